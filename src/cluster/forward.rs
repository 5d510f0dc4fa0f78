//! Admin changes for sessions another node holds. Each (user, device) has one writer, the node
//! holding its session, so the admin API's "set presence on the user's behalf" asked of one
//! node is sent (core NATS request, `<prefix>.admin.<node>`) to every node holding a device of
//! the user; each applies it as its own local change, which replicates like any other. The
//! asking node answers once its replica shows the highest version the holders reported.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;

use super::wire::{subject_token, WireError};
use crate::model::{Availability, PresenceChange};
use crate::registry::{AdminError, Registry};

/// How long a forwarded change waits for the holder's answer.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// A presence change forwarded to the node holding the user's sessions.
#[derive(Clone, PartialEq, Message)]
pub struct ForwardPresence {
    #[prost(string, tag = "1")]
    pub user_id: String,
    /// 0 unset, else the availability's rank + 1 (see `availability_code`).
    #[prost(uint32, tag = "2")]
    pub availability: u32,
    #[prost(uint32, optional, tag = "3")]
    pub show: Option<u32>,
    #[prost(string, optional, tag = "4")]
    pub status: Option<String>,
    #[prost(string, optional, tag = "5")]
    pub description: Option<String>,
    #[prost(btree_map = "string, string", tag = "6")]
    pub state: BTreeMap<String, String>,
    #[prost(bool, tag = "7")]
    pub replace_state: bool,
}

/// The holder's answer.
#[derive(Clone, PartialEq, Message)]
pub struct ForwardReply {
    /// 0 applied, 1 no session here, 2 over a limit.
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub reason: String,
    /// The user's version after the change.
    #[prost(uint64, tag = "3")]
    pub version: u64,
}

fn availability_code(a: Option<Availability>) -> u32 {
    match a {
        None => 0,
        Some(Availability::Online) => 1,
        Some(Availability::Away) => 2,
        Some(Availability::ExtendedAway) => 3,
        Some(Availability::DoNotDisturb) => 4,
        Some(Availability::Offline) => 5,
    }
}

fn availability_from_code(code: u32) -> Result<Option<Availability>, WireError> {
    Ok(match code {
        0 => None,
        1 => Some(Availability::Online),
        2 => Some(Availability::Away),
        3 => Some(Availability::ExtendedAway),
        4 => Some(Availability::DoNotDisturb),
        5 => Some(Availability::Offline),
        _ => return Err(WireError::Invalid("availability")),
    })
}

impl ForwardPresence {
    /// The wire form of `change` for `user_id`.
    pub fn new(user_id: &str, change: &PresenceChange) -> ForwardPresence {
        ForwardPresence {
            user_id: user_id.to_string(),
            availability: availability_code(change.availability),
            show: change.show.map(u32::from),
            status: change.status.clone(),
            description: change.description.clone(),
            state: change.state.clone(),
            replace_state: change.replace_state,
        }
    }

    /// Back to a change (the sender validated it; only the encoding is checked here).
    pub fn into_change(self) -> Result<(String, PresenceChange), WireError> {
        let show = match self.show {
            Some(s) => Some(u16::try_from(s).map_err(|_| WireError::Invalid("show"))?),
            None => None,
        };
        Ok((
            self.user_id,
            PresenceChange {
                availability: availability_from_code(self.availability)?,
                show,
                status: self.status,
                description: self.description,
                state: self.state,
                replace_state: self.replace_state,
            },
        ))
    }
}

/// Why a forwarded change failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    /// The holder refused it (no session there any more, a limit).
    #[error("{0}")]
    Refused(AdminError),
    /// No answer in time, or NATS is unreachable.
    #[error("node {node} did not answer: {reason}")]
    Unavailable {
        /// The holder.
        node: String,
        /// Why.
        reason: String,
    },
}

/// Sends admin changes to other nodes; a cheap clone.
#[derive(Debug, Clone)]
pub struct Forwarder {
    client: async_nats::Client,
    prefix: String,
}

impl Forwarder {
    pub(super) fn new(client: async_nats::Client, prefix: &str) -> Forwarder {
        Forwarder {
            client,
            prefix: prefix.to_string(),
        }
    }

    fn subject(prefix: &str, node: &str) -> String {
        format!("{prefix}.admin.{}", subject_token(node))
    }

    /// Asks `node` to apply `change` to `user_id`'s sessions it holds; returns the version.
    pub async fn set_presence(
        &self,
        node: &str,
        user_id: &str,
        change: &PresenceChange,
    ) -> Result<u64, ForwardError> {
        let unavailable = |reason: String| ForwardError::Unavailable {
            node: node.to_string(),
            reason,
        };
        let payload = Bytes::from(ForwardPresence::new(user_id, change).encode_to_vec());
        let answer = tokio::time::timeout(
            FORWARD_TIMEOUT,
            self.client
                .request(Forwarder::subject(&self.prefix, node), payload),
        )
        .await
        .map_err(|_| unavailable(format!("no answer within {FORWARD_TIMEOUT:?}")))?
        .map_err(|e| unavailable(e.to_string()))?;
        let reply = ForwardReply::decode(answer.payload.as_ref())
            .map_err(|e| unavailable(format!("undecodable answer: {e}")))?;
        match reply.code {
            0 => Ok(reply.version),
            1 => Err(ForwardError::Refused(AdminError::NotFound(reply.reason))),
            _ => Err(ForwardError::Refused(AdminError::Limit(reply.reason))),
        }
    }
}

/// Answers changes forwarded to `node` until `stop`.
pub(super) async fn answer(
    client: async_nats::Client,
    prefix: String,
    node: String,
    registry: Registry,
    stop: CancellationToken,
) {
    let mut requests = match client.subscribe(Forwarder::subject(&prefix, &node)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot take forwarded admin changes: {e}");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return,
            m = requests.next() => match m { Some(m) => m, None => return },
        };
        let Some(reply_to) = message.reply else {
            continue;
        };
        let reply = match ForwardPresence::decode(message.payload.as_ref())
            .map_err(WireError::from)
            .and_then(ForwardPresence::into_change)
        {
            Err(e) => ForwardReply {
                code: 2,
                reason: format!("undecodable forwarded change: {e}"),
                version: 0,
            },
            Ok((user, change)) => match registry.set_presence_for(&user, &change) {
                Ok(p) => ForwardReply {
                    code: 0,
                    reason: String::new(),
                    version: p.version,
                },
                Err(AdminError::NotFound(r)) => ForwardReply {
                    code: 1,
                    reason: r,
                    version: 0,
                },
                Err(AdminError::Limit(r)) => ForwardReply {
                    code: 2,
                    reason: r,
                    version: 0,
                },
            },
        };
        if let Err(e) = client
            .publish(reply_to, Bytes::from(reply.encode_to_vec()))
            .await
        {
            tracing::debug!("cannot answer a forwarded change: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_round_trips() {
        let change = PresenceChange {
            availability: Some(Availability::DoNotDisturb),
            show: Some(7),
            status: Some("busy".into()),
            description: None,
            state: BTreeMap::from([("k".into(), "v".into())]),
            replace_state: true,
        };
        let wire = ForwardPresence::new("alice", &change).encode_to_vec();
        let (user, back) = ForwardPresence::decode(wire.as_slice())
            .unwrap()
            .into_change()
            .unwrap();
        assert_eq!(user, "alice");
        assert_eq!(back, change);
        let bad = ForwardPresence {
            availability: 99,
            ..ForwardPresence::default()
        };
        assert!(bad.into_change().is_err());
    }
}
