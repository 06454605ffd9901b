-- evidence (EDGE-OPD evidence mask, inferred form): keep the tokens the privileged context explains.
--
--   e_t = teacher_logprob - ref_logprob   (the teacher reads the context c, the reference does not)
--   keep  e_t >= $threshold               (nats; NULL = rule off)
--   or    e_t >= quantile(1 - $top_fraction of e over student tokens)   (NULL = rule off)
--   or    ($span) the token id occurs in the context: in teacher_prompt_ids but not in
--         train_prompt_ids (an id-level approximation of "evidence spans": a context word that also
--         appears in the question is not counted)
--   every other student token gets weight $keep_rest (0 = strict mask); segment 1 gets 0.
--
-- Parameters: $threshold (DOUBLE or NULL), $top_fraction (in (0, 1] or NULL), $span (BOOLEAN),
-- $keep_rest in [0, 1]. Needs: ref_logprob when $threshold or $top_fraction is set (score with
-- ref.path set).
WITH e AS (
    SELECT
        t.rid,
        t.segment,
        (t.teacher_logprob - t.ref_logprob)::DOUBLE AS ev,
        list_contains(r.teacher_prompt_ids, t.token_id)
            AND NOT list_contains(r.train_prompt_ids, t.token_id) AS in_ctx
    FROM tok AS t
    JOIN rollouts_in AS r USING (sample_id)
),
q AS (
    -- (the quantile argument must be a constant: coalesce, then drop it when the rule is off)
    SELECT CASE WHEN $top_fraction IS NULL THEN NULL
                ELSE quantile_cont(ev, 1.0 - coalesce($top_fraction, 1.0)) END AS ev_q
    FROM e
    WHERE segment = 0
)
SELECT
    rid,
    CASE
        WHEN segment <> 0 THEN 0.0
        WHEN coalesce(ev >= $threshold, false)
             OR coalesce(ev >= ev_q, false)
             OR ($span AND in_ctx) THEN 1.0
        ELSE $keep_rest
    END AS weight
FROM e, q
