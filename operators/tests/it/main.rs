//! spendflow-operators' integration tests in one test binary: the oracle (every aggregate at
//! every closed epoch equals a from-scratch recomputation) and the replay rewrites.

mod cluster;
mod oracle;
mod reference;
mod replay_touch;
