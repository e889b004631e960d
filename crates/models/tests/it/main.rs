//! Integration tests for legion-models, in one binary (tract links once).

mod cache;
mod committed;
mod fixtures;
mod tract_load;
