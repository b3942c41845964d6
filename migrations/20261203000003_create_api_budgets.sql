-- Each Calendly user's API window, one row per budget, shared by every worker process
-- (ARCHITECTURE.md, "Calendly API budget"): a process takes a request from the row before calling
-- Calendly, and what Calendly's answer says about the window corrects the row afterwards.
-- UNLOGGED: a budget is advice about the next minute, not data. Its updates then write no WAL, so a
-- statement does not wait for a disk flush while it holds the user's row (measured: with WAL, 32
-- concurrent calls for one user took 10x two bare round trips); after a crash the table is empty
-- and every window starts again from the assumed free-plan limit.
CREATE UNLOGGED TABLE api_budgets (
    -- `api:<Calendly user>` for API calls, `token:<Calendly user>` for token requests.
    budget_key    text PRIMARY KEY,
    request_limit integer NOT NULL CHECK (request_limit >= 0),
    -- Requests taken in this window: by this fleet (answered or in flight), or, when an answer
    -- says more were made (by anyone), as Calendly counted them.
    used          integer NOT NULL CHECK (used >= 0),
    resets_at     timestamptz NOT NULL,
    -- Counts windows, so an answer to a request taken in an earlier window is not read as news
    -- about this one.
    window_no     bigint NOT NULL DEFAULT 0,
    -- Whether an answer has confirmed this window's limit and reset, or they are still assumed.
    confirmed     boolean NOT NULL DEFAULT false
);
