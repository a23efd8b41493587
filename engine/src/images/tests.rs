//! Unit tests of the image rules with the in-memory store.
