//! Unit tests of Personnel with the in-memory directory and store.
