-- Example queries over a run, for `distillery-sql RUN_DIR "<query>"` (views: rollouts, tokens,
-- selected). Each example starts with a line "-- example: <title>". `distillery-sql --examples`
-- prints them. The same views in plain `duckdb`:
--   CREATE VIEW tokens AS SELECT * FROM read_parquet('runs/demo/tokens/bucket=*/*.parquet', hive_partitioning = true);

-- example: the tokens where teacher and student disagree most (k1 reverse-KL estimate)
SELECT sample_id, pos, token_id,
       round(behavior_logprob - teacher_logprob, 3) AS rkl_k1,
       round(exp(behavior_logprob), 3) AS p_student,
       round(exp(teacher_logprob), 3) AS p_teacher
FROM tokens
WHERE segment = 0
ORDER BY behavior_logprob - teacher_logprob DESC
LIMIT 20;

-- example: selected fraction by position bucket, per selection
SELECT selection,
       CASE WHEN pos < 4 THEN '0-3' WHEN pos < 8 THEN '4-7' WHEN pos < 16 THEN '8-15'
            WHEN pos < 32 THEN '16-31' ELSE '32+' END AS positions,
       count(*) AS tokens,
       round(avg((w > 0)::INT), 3) AS kept_fraction,
       round(avg(w), 3) AS mean_weight
FROM (SELECT selection, unnest(weights) AS w, unnest(range(response_len)) AS pos FROM selected)
GROUP BY ALL
ORDER BY selection, min(pos);

-- example: mean teacher and behaviour entropy, guided vs unguided rollouts
SELECT is_guided, count(*) AS tokens,
       round(avg(teacher_entropy), 3) AS mean_teacher_entropy,
       round(avg(behavior_entropy), 3) AS mean_behavior_entropy
FROM tokens
WHERE segment = 0
GROUP BY is_guided
ORDER BY is_guided;

-- example: how much probability the stored teacher top-K holds (distribution of the top-K mass)
SELECT floor(exp(teacher_topk_logmass) * 10) / 10 AS topk_mass_from,
       count(*) AS tokens,
       round(count(*) / sum(count(*)) OVER (), 3) AS share
FROM tokens
GROUP BY 1
ORDER BY 1;

-- example: the samples with the largest reverse-KL estimate (sum of k1 over the response)
SELECT t.sample_id, any_value(r.prompt_id) AS prompt_id, any_value(r.is_guided) AS guided,
       count(*) AS tokens,
       round(sum(t.behavior_logprob - t.teacher_logprob), 2) AS rkl_k1_sum,
       round(avg(t.behavior_logprob - t.teacher_logprob), 3) AS rkl_k1_per_token
FROM tokens AS t
JOIN rollouts AS r USING (sample_id)
WHERE t.segment = 0
GROUP BY t.sample_id
ORDER BY rkl_k1_sum DESC
LIMIT 10;
