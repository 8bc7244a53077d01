//! Test support for twill-policy, in a crate of its own so that the enforcer binary does not
//! carry it: the upstream NetworkPolicy conformance world and its scenarios
//! ([`conformance`]). twill-policy's integration tests use it as a dev-dependency.

pub mod conformance;
