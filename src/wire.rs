//! Domain values ⇄ protobuf messages, and server frames encoded once into `Bytes` with their
//! length prefix. The only module besides `command` that touches `pb` types; it holds no state.

use bytes::Bytes;

use crate::codec::encode_delimited;
use crate::model::{
    Availability, ChannelEventKind, ChannelEventView, ChannelMember, CloseKind, EventKind,
    EventView, OfflineReason, PresenceSnapshot,
};
use crate::pb;
use crate::registry::WireEncoder;

/// Domain availability → protobuf.
pub fn availability_to_pb(a: Availability) -> pb::Availability {
    match a {
        Availability::Online => pb::Availability::Online,
        Availability::Away => pb::Availability::Away,
        Availability::ExtendedAway => pb::Availability::Xa,
        Availability::DoNotDisturb => pb::Availability::Dnd,
        Availability::Offline => pb::Availability::Offline,
    }
}

/// Protobuf availability → domain; `None` for UNSPECIFIED (meaning "unchanged") and for
/// values this server does not know.
pub fn availability_from_pb(value: i32) -> Result<Option<Availability>, i32> {
    match pb::Availability::try_from(value) {
        Ok(pb::Availability::Unspecified) => Ok(None),
        Ok(pb::Availability::Online) => Ok(Some(Availability::Online)),
        Ok(pb::Availability::Away) => Ok(Some(Availability::Away)),
        Ok(pb::Availability::Xa) => Ok(Some(Availability::ExtendedAway)),
        Ok(pb::Availability::Dnd) => Ok(Some(Availability::DoNotDisturb)),
        Ok(pb::Availability::Offline) => Ok(Some(Availability::Offline)),
        Err(_) => Err(value),
    }
}

/// Domain presence → protobuf.
pub fn presence_to_pb(p: &PresenceSnapshot) -> pb::Presence {
    pb::Presence {
        user_id: p.user_id.clone(),
        availability: availability_to_pb(p.availability) as i32,
        show: u32::from(p.show),
        status: p.status.clone(),
        description: p.description.clone(),
        state: p.state.clone(),
        devices: p
            .devices
            .iter()
            .map(|d| pb::DevicePresence {
                device_id: d.device_id.clone(),
                platform: d.platform.clone(),
                availability: availability_to_pb(d.availability) as i32,
                connected_since_ms: d.connected_since_ms,
            })
            .collect(),
        last_seen_ms: p.last_seen_ms,
        version: p.version,
        user_data: p.user_data.clone(),
    }
}

fn event_kind_to_pb(kind: EventKind) -> pb::EventKind {
    match kind {
        EventKind::Online => pb::EventKind::Online,
        EventKind::Update => pb::EventKind::Update,
        EventKind::Offline => pb::EventKind::Offline,
        EventKind::Directed => pb::EventKind::Directed,
    }
}

/// Domain offline reason → protobuf.
pub fn offline_reason_to_pb(reason: OfflineReason) -> pb::OfflineReason {
    match reason {
        OfflineReason::Disconnect => pb::OfflineReason::Disconnect,
        OfflineReason::Timeout => pb::OfflineReason::Timeout,
        OfflineReason::ConnectionLost => pb::OfflineReason::ConnectionLost,
        OfflineReason::TakenOver => pb::OfflineReason::TakenOver,
        OfflineReason::Kicked => pb::OfflineReason::Kicked,
        OfflineReason::ServerShutdown => pb::OfflineReason::ServerShutdown,
    }
}

/// Domain close kind → protobuf.
pub fn close_code_to_pb(kind: CloseKind) -> pb::CloseCode {
    match kind {
        CloseKind::Normal => pb::CloseCode::Normal,
        CloseKind::AuthFailed => pb::CloseCode::AuthFailed,
        CloseKind::ProtocolViolation => pb::CloseCode::ProtocolViolation,
        CloseKind::FrameTooLarge => pb::CloseCode::FrameTooLarge,
        CloseKind::DeadlineExceeded => pb::CloseCode::DeadlineExceeded,
        CloseKind::KeepaliveTimeout => pb::CloseCode::KeepaliveTimeout,
        CloseKind::TakenOver => pb::CloseCode::TakenOver,
        CloseKind::SlowConsumer => pb::CloseCode::SlowConsumer,
        CloseKind::ServerShutdown => pb::CloseCode::ServerShutdown,
        CloseKind::Overloaded => pb::CloseCode::Overloaded,
        CloseKind::TokenExpired => pb::CloseCode::TokenExpired,
        CloseKind::DeviceLimit => pb::CloseCode::DeviceLimit,
        CloseKind::Kicked => pb::CloseCode::Kicked,
        CloseKind::NodeUnavailable => pb::CloseCode::NodeUnavailable,
    }
}

/// A presence event message.
pub fn presence_event_to_pb(event: &EventView<'_>) -> pb::PresenceEvent {
    pb::PresenceEvent {
        user_id: event.presence.user_id.clone(),
        kind: event_kind_to_pb(event.kind) as i32,
        presence: Some(presence_to_pb(event.presence)),
        reason: event
            .reason
            .map_or(pb::OfflineReason::Unspecified, offline_reason_to_pb) as i32,
        version: event.presence.version,
        device_id: event.device_id.to_string(),
    }
}

/// Encodes a server frame with its length prefix.
pub fn frame(request_id: u64, body: pb::server_frame::Body) -> Bytes {
    encode_delimited(&pb::ServerFrame {
        request_id,
        body: Some(body),
    })
}

/// Encodes a close frame.
pub fn close_frame(kind: CloseKind, reason: &str, reconnect_after_ms: u64) -> Bytes {
    frame(
        0,
        pb::server_frame::Body::Close(pb::Close {
            code: close_code_to_pb(kind) as i32,
            reason: reason.to_string(),
            reconnect_after_ms,
        }),
    )
}

/// Label for a server frame body in the frames-out metric.
pub fn server_body_kind(body: &pb::server_frame::Body) -> &'static str {
    use pb::server_frame::Body;
    match body {
        Body::ConnAck(_) => "conn_ack",
        Body::Pong(_) => "pong",
        Body::Close(_) => "close",
        Body::Error(_) => "error",
        Body::SetPresenceResult(_) => "set_presence_result",
        Body::SubscribeResult(_) => "subscribe_result",
        Body::UnsubscribeResult(_) => "unsubscribe_result",
        Body::ListSubscriptionsResult(_) => "list_subscriptions_result",
        Body::GetPresenceResult(_) => "get_presence_result",
        Body::DirectedPresenceResult(_) => "directed_presence_result",
        Body::PresenceEvent(_) => "presence_event",
        Body::ChannelEvent(_) => "channel_event",
        Body::ChannelResult(_) => "channel_result",
        Body::WhoNowResult(_) => "who_now_result",
        Body::WhereNowResult(_) => "where_now_result",
        Body::ChannelStateResult(_) => "channel_state_result",
        Body::PresenceBatch(_) => "presence_batch",
        Body::DeliveryResult(_) => "delivery_result",
        Body::ResumeResult(_) => "resume_result",
        Body::SetInvisibleResult(_) => "set_invisible_result",
        Body::BlockResult(_) => "block_result",
        Body::ListBlockedResult(_) => "list_blocked_result",
        Body::PrivacySettings(_) => "privacy_settings",
        Body::SetApprovalResult(_) => "set_approval_result",
        Body::ListApprovalsResult(_) => "list_approvals_result",
        Body::SubscriptionRequest(_) => "subscription_request",
        Body::SubscriptionAccepted(_) => "subscription_accepted",
    }
}

/// A user's current presence as an event of `kind` (a Resume's or a catch-up batch's entry):
/// every field, no reason, no device.
pub fn snapshot_event(snapshot: &PresenceSnapshot, kind: pb::EventKind) -> pb::PresenceEvent {
    pb::PresenceEvent {
        user_id: snapshot.user_id.clone(),
        kind: kind as i32,
        presence: Some(presence_to_pb(snapshot)),
        reason: 0,
        version: snapshot.version,
        device_id: String::new(),
    }
}

/// Label for a client frame body: the operation name used in metrics and error frames.
pub fn client_body_kind(body: Option<&pb::client_frame::Body>) -> &'static str {
    use pb::client_frame::Body;
    match body {
        None => "empty",
        Some(Body::Connect(_)) => "connect",
        Some(Body::Ping(_)) => "ping",
        Some(Body::Disconnect(_)) => "disconnect",
        Some(Body::SetPresence(_)) => "set_presence",
        Some(Body::Subscribe(_)) => "subscribe",
        Some(Body::Unsubscribe(_)) => "unsubscribe",
        Some(Body::ListSubscriptions(_)) => "list_subscriptions",
        Some(Body::GetPresence(_)) => "get_presence",
        Some(Body::DirectedPresence(_)) => "directed_presence",
        Some(Body::JoinChannel(_)) => "join_channel",
        Some(Body::LeaveChannel(_)) => "leave_channel",
        Some(Body::WatchChannel(_)) => "watch_channel",
        Some(Body::UnwatchChannel(_)) => "unwatch_channel",
        Some(Body::WhoNow(_)) => "who_now",
        Some(Body::WhereNow(_)) => "where_now",
        Some(Body::SetChannelState(_)) => "set_channel_state",
        Some(Body::GetChannelState(_)) => "get_channel_state",
        Some(Body::RemoveChannelState(_)) => "remove_channel_state",
        Some(Body::SetDelivery(_)) => "set_delivery",
        Some(Body::Resume(_)) => "resume",
        Some(Body::SetInvisible(_)) => "set_invisible",
        Some(Body::Block(_)) => "block",
        Some(Body::Unblock(_)) => "unblock",
        Some(Body::ListBlocked(_)) => "list_blocked",
        Some(Body::SetPrivacy(_)) => "set_privacy",
        Some(Body::GetPrivacy(_)) => "get_privacy",
        Some(Body::SetApproval(_)) => "set_approval",
        Some(Body::ListApprovals(_)) => "list_approvals",
    }
}

/// Domain channel member → protobuf.
pub fn channel_member_to_pb(m: &ChannelMember) -> pb::ChannelMember {
    pb::ChannelMember {
        user_id: m.user_id.clone(),
        device_id: m.device_id.clone(),
        state: m.state.clone(),
        joined_at_ms: m.joined_at_ms,
    }
}

fn channel_kind_to_pb(kind: ChannelEventKind) -> pb::ChannelEventKind {
    match kind {
        ChannelEventKind::Join => pb::ChannelEventKind::Join,
        ChannelEventKind::Leave => pb::ChannelEventKind::Leave,
        ChannelEventKind::Timeout => pb::ChannelEventKind::Timeout,
        ChannelEventKind::StateChanged => pb::ChannelEventKind::StateChanged,
        ChannelEventKind::Online => pb::ChannelEventKind::Online,
        ChannelEventKind::Offline => pb::ChannelEventKind::Offline,
        ChannelEventKind::Interval => pb::ChannelEventKind::Interval,
    }
}

/// A channel event message.
pub fn channel_event_to_pb(event: &ChannelEventView<'_>) -> pb::ChannelEvent {
    let members = |list: &[ChannelMember]| list.iter().map(channel_member_to_pb).collect();
    pb::ChannelEvent {
        channel: event.channel.to_string(),
        kind: channel_kind_to_pb(event.kind) as i32,
        member: event.member.map(channel_member_to_pb),
        occupancy: event.occupancy,
        interval: event.interval.map(|b| pb::ChannelInterval {
            joins: members(&b.joins),
            leaves: members(&b.leaves),
            timeouts: members(&b.timeouts),
            state_changes: members(&b.state_changes),
            here_now_refresh: b.refresh,
        }),
    }
}

/// The protobuf implementation of the registry's encoder.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProtoEncoder;

impl WireEncoder for ProtoEncoder {
    fn presence_event(&self, event: &EventView<'_>) -> Bytes {
        frame(
            0,
            pb::server_frame::Body::PresenceEvent(presence_event_to_pb(event)),
        )
    }

    fn close(&self, kind: CloseKind, reason: &str, reconnect_after_ms: u64) -> Bytes {
        close_frame(kind, reason, reconnect_after_ms)
    }

    fn channel_event(&self, event: &ChannelEventView<'_>) -> Bytes {
        frame(
            0,
            pb::server_frame::Body::ChannelEvent(channel_event_to_pb(event)),
        )
    }

    fn privacy_notice(&self, notice: &crate::registry::PrivacyNotice<'_>) -> Bytes {
        use crate::registry::PrivacyNotice;
        let body = match *notice {
            PrivacyNotice::Request { requester, at_ms } => {
                pb::server_frame::Body::SubscriptionRequest(pb::SubscriptionRequest {
                    requester_id: requester.to_string(),
                    requested_at_ms: at_ms,
                })
            }
            PrivacyNotice::Accepted { user, presence } => {
                pb::server_frame::Body::SubscriptionAccepted(pb::SubscriptionAccepted {
                    user_id: user.to_string(),
                    presence: Some(presence_to_pb(presence)),
                })
            }
        };
        frame(0, body)
    }
}
