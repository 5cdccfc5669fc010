"""Decoding programs: what turns a trained net into samples, beside the nets (which hold only their
parameters, forward passes and the prefill / cached-step primitives these programs call).

* :mod:`.ar`: the AR image GPT's KV-cached token sampling;
* :mod:`.maskgit`: MaskGIT's parallel decoding;
* :mod:`.transfusion`: Transfusion's text -> image, image -> text (captions and caption
  likelihoods), and :mod:`.document`: its interleaved documents.

Every prompt row comes from :mod:`unifuse.models.rows`; token draws and guidance from
:mod:`unifuse.sampling`. A paradigm's spec names the program its pipeline runs (``decoder``).
"""
