# unifuse: `make train` to see it work, `make test` to check it. `make help` lists everything.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DATA   := data/emoji32/train/_index.json
ARGS   ?=

.PHONY: help setup data train train-vqvae train-ar train-maskgit train-kl train-ldm test bench lint mutation clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

setup: $(STAMP)  ## virtualenv in .venv with unifuse installed editable (+dev extra); idempotent

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	@touch $(STAMP)

data: setup  ## build the embedded emoji dataset (32x32) into data/ if missing
	@test -f $(DATA) || $(BIN)/python -m unifuse.data build emoji --size 32

train: setup data  ## text-to-image Transfusion on emoji (+ its KL autoencoder when there is none); ARGS="..."
	@$(BIN)/python -c "from unifuse.config import latest_checkpoint as l; l('outputs', 'kl_emoji')" 2>/dev/null \
		|| $(BIN)/python -m unifuse.train experiment=kl_emoji
	$(BIN)/python -m unifuse.train experiment=transfusion_emoji $(ARGS)

train-vqvae: setup data  ## the VQ-VAE image tokenizer of the AR GPT and MaskGIT (about 7 min on CPU)
	$(BIN)/python -m unifuse.train experiment=vqvae_emoji $(ARGS)

train-ar: setup data  ## AR image GPT on emoji codes from the newest `make train-vqvae` tokenizer (ARGS="...")
	$(BIN)/python -m unifuse.train experiment=ar_emoji $(ARGS)

train-maskgit: setup data  ## MaskGIT on emoji codes from the newest `make train-vqvae` tokenizer
	$(BIN)/python -m unifuse.train experiment=maskgit_emoji $(ARGS)

train-kl: setup data  ## KL autoencoder on emoji (the latent space of train-ldm; 3-6 min on CPU)
	$(BIN)/python -m unifuse.train experiment=kl_emoji $(ARGS)

train-ldm: setup data  ## text-to-image latent diffusion on the newest train-kl autoencoder (about 14 min)
	$(BIN)/python -m unifuse.train experiment=ldm_emoji $(ARGS)

test: setup  ## run the test suite
	$(BIN)/python -m pytest $(ARGS)

bench: setup data  ## run the benchmarks under experiments/bench and print their figures
	$(BIN)/python experiments/bench/loader.py
	$(BIN)/python experiments/bench/autoencoders.py
	$(BIN)/python experiments/bench/transformer.py
	$(BIN)/python experiments/bench/attention.py
	$(BIN)/python experiments/bench/streams.py
	$(BIN)/python experiments/bench/diffusion.py
	$(BIN)/python experiments/bench/scale.py
	$(BIN)/python experiments/bench/mfu.py
	$(BIN)/python -m pip install -q -e '.[bench]' && $(BIN)/python experiments/bench/transfusion.py

lint: setup  ## ruff
	$(BIN)/ruff check unifuse tests experiments

mutation: setup  ## mutation-test attention/transformer/maskgit/stream ([tool.mutmut]; slow, not in `make test`)
	@# one torch thread per worker: mutmut's timeout is a CPU-time limit, which intra-op threads would eat
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $${JOBS:-$$(nproc)} $(ARGS)
	@echo "survivors (inspect one with: $(BIN)/mutmut show NAME):"
	@$(BIN)/mutmut results

clean:  ## remove run outputs (keeps .venv and data/)
	rm -rf outputs multirun wandb lightning_logs
