"""SQL migrations for uro-recs' own tables, applied in order by `uro-recs db migrate`."""
