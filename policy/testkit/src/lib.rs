//! Test support for twill-policy, in a crate of its own so that the enforcer binary does not
//! carry it: the upstream NetworkPolicy conformance world and its scenarios
//! ([`conformance`]), and the upstream cluster-policy (ClusterNetworkPolicy,
//! AdminNetworkPolicy, BaselineAdminNetworkPolicy) conformance world and its scenarios
//! ([`cluster`]). twill-policy's integration tests use it as a dev-dependency.

pub mod cluster;
pub mod conformance;
