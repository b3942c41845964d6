-- Takes one request from each of many `api_budgets` windows in one round trip: the worker gathers
-- the takes of its concurrent Calendly calls (worker/src/budget.rs), as it gathers connection
-- lookups, instead of spending a statement per call (BENCHMARKS.md, "The budget's takes gathered").
--
-- Request i is taken exactly as a statement of its own would take it (common/src/db/budgets.rs
-- says the rule): a key not seen before starts a window as the request describes; a window past its
-- reset starts the next one; otherwise the request is counted while the window has one left, and
-- when it has none the answer says how long until the window resets. Several requests for one key
-- are taken one after another, in the order given, so the later ones see the earlier ones counted.
-- Keys are visited in sorted order: two callers taking overlapping keys lock their rows in the same
-- order and never deadlock (each row stays locked until the call returns).
CREATE FUNCTION take_api_budgets(keys text[], limits integer[], lengths_ms bigint[], known boolean[])
RETURNS TABLE (
    -- 1-based position of the request in `keys`.
    wanted_at    bigint,
    granted      boolean,
    -- Granted: the row's window number, count (this request included), limit and whether an
    -- answer confirmed them. Spent: `confirmed` only.
    window_of    bigint,
    used_now     integer,
    limit_now    integer,
    confirmed_now boolean,
    -- Seconds until the window resets (granted: as of the take; spent: as of now).
    resets_in    double precision
)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT * FROM unnest(keys, limits, lengths_ms, known) WITH ORDINALITY AS w(k, l, len, kn, i) ORDER BY k, i
    LOOP
        wanted_at := r.i;
        INSERT INTO api_budgets AS b (budget_key, request_limit, used, resets_at, confirmed)
        VALUES (r.k, r.l, 1, statement_timestamp() + r.len * interval '1 millisecond', r.kn)
        ON CONFLICT (budget_key) DO UPDATE SET
            used = CASE WHEN b.resets_at <= statement_timestamp() THEN 1 ELSE b.used + 1 END,
            window_no = b.window_no + (b.resets_at <= statement_timestamp())::int,
            confirmed = CASE WHEN b.resets_at <= statement_timestamp() THEN r.kn ELSE b.confirmed END,
            resets_at = CASE WHEN b.resets_at <= statement_timestamp()
                THEN statement_timestamp() + r.len * interval '1 millisecond' ELSE b.resets_at END
        WHERE b.resets_at <= statement_timestamp() OR b.used < b.request_limit
        RETURNING b.window_no, b.used, b.request_limit, b.confirmed,
            GREATEST(EXTRACT(EPOCH FROM b.resets_at - statement_timestamp()), 0)::float8
        INTO window_of, used_now, limit_now, confirmed_now, resets_in;
        granted := FOUND;
        IF NOT granted THEN
            window_of := NULL;
            used_now := NULL;
            limit_now := NULL;
            -- The row was locked by the attempt above and is still there.
            SELECT GREATEST(EXTRACT(EPOCH FROM b.resets_at - clock_timestamp()), 0)::float8, b.confirmed
            INTO resets_in, confirmed_now
            FROM api_budgets b WHERE b.budget_key = r.k;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
