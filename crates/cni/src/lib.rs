//! podsnap's part of pod networking: keeping a pod's IP address across a checkpoint and restore
//! on the same node (the talk's P1 "kept IP" on suspend/resume).
//!
//! A restored pod gets a new network namespace, and with it whatever address the node's IPAM
//! plugin hands out next. Clients that cached the old address, and TCP connections restored
//! with `podsnap.io/tcp-established`, need the old one. containerd's CRI passes no address
//! request to CNI, so the request travels beside it:
//!
//! - podsnapd's `RestorePod`, asked to keep the address (`podsnap.io/keep-ip: "true"`, an option
//!   or a pod annotation), writes an **address grant** ([`grant`]): a root-only file under
//!   [`grant::GRANT_DIR`] named by the new pod's UID, holding the addresses the checkpoint
//!   recorded. It removes the grant once the sandbox exists (or failed).
//! - **`podsnap-ipam`** ([`ipam`]), the IPAM plugin of the node's CNI network, delegates to
//!   another IPAM plugin (`host-local` by default). On `ADD` for a pod that holds a grant
//!   (`K8S_POD_UID` in `CNI_ARGS`, which containerd sets) it asks the delegate for exactly those
//!   addresses (host-local's `ips` runtime config); host-local refuses one that is taken or
//!   outside its ranges, and the restore fails naming it. Every other call passes through
//!   unchanged.
//!
//! Nobody but podsnapd can ask for an address: a pod's annotations never reach the plugin, and
//! only root can write the grant directory.

pub mod grant;
pub mod ipam;
