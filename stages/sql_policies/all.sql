-- all: every student token carries weight 1; teacher-prefix tokens (segment 1) weight 0.
--
-- The baseline of every OPD paper (Lightning OPD, Thinking-Machines OPD): train on all the tokens the
-- student sampled itself. Parameters: none.
--
-- Contract of a policy file (copy one to write your own): one SELECT over the view `tok` (one row per
-- response token: rid, shard, sample_id, pos, token_id, segment, is_guided, teacher_logprob,
-- behavior_logprob, behavior_entropy, teacher_entropy, ref_logprob, teacher_topk_logmass, teacher_id
-- (the routed teacher's name with several teachers, else null), xtok_chunk, xtok_chunk_logprob,
-- xtok_mapped_k, xtok_mapped_frac (a teacher of another tokenizer, else null)) and, when
-- needed, `rollouts_in` (the rollouts table). It returns exactly one row per row of `tok`:
-- `rid` and `weight` (DOUBLE >= 0, 0 = excluded). Parameters are DuckDB prepared parameters ($name),
-- bound by stages.select; `$seed` (cfg.seed) and `$ln_v` (ln of the vocabulary size) are always
-- available.
SELECT rid, CASE WHEN segment = 0 THEN 1.0 ELSE 0.0 END AS weight
FROM tok
