//! Throwaway PostgreSQL clusters for tests that need their own server.
