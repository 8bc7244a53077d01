//! twill's dataplane, built the same way as every twill component:
//!
//! * [`desired`] — a pure function from the local node and its peers' leases to the neighbour,
//!   FDB and route entries the kernel must hold;
//! * [`reconcile`] — a pure diff of that desired state against the observed one, giving a short,
//!   ordered list of [`reconcile::Op`]s;
//! * [`netlink`] — the thin, idempotent effector that observes the kernel and applies the ops;
//! * [`vxlan`] and [`hostgw`] — the per-backend device handling (`flannel.<VNI>`, the external link).
//!
//! Nothing here knows about etcd or Kubernetes: peers arrive as plain [`model::PeerLease`]s.

pub mod desired;
pub mod hostgw;
pub mod model;
pub mod netlink;
pub mod reconcile;
pub mod vxlan;

pub use desired::{desired_state, Topology};
pub use model::{BackendKind, DataplaneState, LinkRef, PeerFamily, PeerLease, Skipped};
pub use reconcile::{diff, Op};
