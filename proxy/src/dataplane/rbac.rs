//! The network RBAC step: the chosen chain's `envoy.filters.network.rbac` filters decide the
//! connection, in configuration order, before its terminal filter (tcp_proxy or the HCM) runs
//! and before any upstream connect. Envoy decides on the connection's first bytes; skiff
//! decides at accept, on the same facts (no filter here reads the bytes), after the chain's
//! TLS handshake when it terminates TLS, so `authenticated` principals see the client's
//! verified certificate. A denial closes the
//! connection, after the filter's `delay_deny` when set.

use std::time::Duration;

use super::error::ConnError;
use super::route::{Chain, ConnFacts};
use crate::rbac::{ConnectionFacts, PeerIdentity, denied_detail};
use crate::state::Snapshot;

/// A connection an RBAC filter refused.
#[derive(Debug)]
pub(super) struct Denial {
    error: ConnError,
    delay: Option<Duration>,
}

impl Denial {
    /// Wait the filter's `delay_deny`, then give the error that closes the connection.
    pub(super) async fn close(self) -> ConnError {
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        self.error
    }
}

/// Run every RBAC filter of `chain` on the connection described by `facts`, counting each
/// decision in the filter's counters (resolved when `snap` was published); the first denial
/// stops the walk, as Envoy's filter chain stops at the filter that closes the connection.
pub(super) fn check(
    snap: &Snapshot,
    chain: &Chain,
    facts: &ConnFacts<'_>,
    peer: Option<&PeerIdentity>,
) -> Result<(), Denial> {
    let filters = &chain.get().rbac;
    if filters.is_empty() {
        return Ok(());
    }
    let conn = ConnectionFacts {
        source: facts.src.ip(),
        direct_remote: facts.direct_src.ip(),
        remote: facts.src.ip(),
        destination: facts.dst,
        sni: facts.server_name,
        peer,
    };
    for f in filters {
        let d = f.config.check(&conn);
        snap.rbac_counters(&f.stats).count(&d);
        if !d.allowed() {
            return Err(Denial {
                error: ConnError::RbacDenied {
                    listener: chain.listener().name.clone(),
                    filter: f.name.clone(),
                    detail: denied_detail(d.enforced.and_then(|v| v.policy)),
                },
                delay: f.config.delay_deny,
            });
        }
    }
    Ok(())
}
