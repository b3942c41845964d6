-- A refresh lease instead of a row lock held across the call to Calendly: the worker that claims
-- the lease (one short UPDATE) refreshes the single-use token and stores the new pair (another short
-- UPDATE); everyone else waits for the new pair without holding a database connection. A row lock
-- held for the whole refresh pinned pooled connections (the refresher's and every waiter's) while
-- Calendly was slow, and starved other users' deliveries of connections.
ALTER TABLE calendar_connections
    ADD COLUMN refresh_lease_owner uuid,
    ADD COLUMN refresh_lease_until timestamptz;
