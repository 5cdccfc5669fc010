"""The run machinery around the models: checkpoint reading and writing, sharded loading, exact
resume, preemption, EMA, the guard, parallel strategies and their memory plan, callbacks,
throughput and FLOP counting, the progress bar and sample grids."""
