"""The offline teacher cache (``sakd cache-teacher``; ``distillation.teacher_cache``): the teacher runs once
over the training documents and its sparse signal is stored in safetensors shards with a manifest.

:mod:`.manifest` (what a cache holds, the manifest), :mod:`.shardfile` (the shard format), :mod:`.bitpack`
(ids in the fewest bits), :mod:`.blocks` (blocks with character ends), :mod:`.fingerprint` (teacher,
tokenizer and documents identities), :mod:`.extract` + :mod:`.generate` (writing), :mod:`.reader` +
:mod:`.lookup` (reading, same blocks or aligned across tokenizers), :mod:`.verify` (integrity),
:mod:`.attach` (a training run reading a cache).
"""
