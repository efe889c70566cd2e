"""Caption texts -> a ``CaptionEmbeddings`` table, in the one process that loads the text model.

A preprocessing run embeds every caption its scenes need here, once and in batches, before
the scenes are processed; the Dask workers only look rows up (``captions.embed_captions``), so
they never import torch or load a text model (about 1 GB and 15 s per worker otherwise).
This module imports torch: the per-scene code must not import it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from preprocessing.captions import CaptionEmbeddings, embed_captions
from preprocessing.text import MiniLMTextEncoder, OpenClipTextEncoder, build_text_encoder


@functools.cache
def text_encoder(spec: str) -> MiniLMTextEncoder | OpenClipTextEncoder:
    """One encoder per process (loading MiniLM takes seconds)."""
    return build_text_encoder(spec)


def embed_texts(texts: Iterable[str], spec: str, batch_size: int = 64) -> CaptionEmbeddings:
    """Embed the distinct non-blank ``texts`` with the encoder ``spec``, ``batch_size`` at a time.

    Texts are embedded in sorted order, so the table depends only on the set of texts. A row
    can differ from the same text embedded in another batch in the last float16 bit (the
    batch changes the float32 summation order), as the per-scene batches before it did.
    """
    unique = sorted({t for t in texts if t.strip()})
    encoder = text_encoder(spec)
    return CaptionEmbeddings(encoder.name, tuple(unique), embed_captions(unique, encoder, batch_size))
