-- When a connection was imported from an existing integration (`calsync-worker import-connections`);
-- NULL for connections made through calsync's own connect flow. A rerun of the import tells the
-- rows it made ("already imported") from connections it must leave alone.
ALTER TABLE calendar_connections ADD COLUMN imported_at timestamptz;
