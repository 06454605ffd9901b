-- xtok_mapped: with a teacher of another tokenizer (score.cross_tokenizer=align), keep the student
-- tokens of the aligned chunks whose teacher top-K mapped well into the student's vocabulary:
--
--   the chunk's mapped fraction (xtok_mapped_frac at its first token) >= $min_frac
--
-- A chunk is kept or dropped whole (chunk_opd needs all of a chunk's tokens together); tokens the
-- teacher did not score (xtok_chunk < 0) have fraction 0. Needs the xtok_* columns (null on a
-- same-tokenizer run: the select stage says so). Parameters: $min_frac in [0, 1].
SELECT
    t.rid,
    CASE WHEN t.segment = 0 AND c.frac >= $min_frac THEN 1.0 ELSE 0.0 END AS weight
FROM tok AS t
LEFT JOIN (
    SELECT sample_id, xtok_chunk, max(xtok_mapped_frac) AS frac FROM tok GROUP BY ALL
) AS c USING (sample_id, xtok_chunk)
