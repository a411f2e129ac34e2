//! One MQTT connection of either protocol version (3.1.1 through rumqttc's v4 client, 5
//! through its v5 client), seen by the link as one client type and one event type.
//!
//! Everything the link needs from a connection is here: publish, subscribe, disconnect, and
//! the events it acts on. The difference that matters is in [`LinkEvent::Refused`]: an MQTT 5
//! broker can answer a publish with a PUBACK carrying an error reason code (not authorized,
//! quota exceeded …); the link must then keep the message, where 3.1.1 has no way to say so.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::{Outgoing, QoS, Transport};
use tokio::sync::mpsc;

use crate::config::{GatewayConfig, Protocol};
use crate::link::tls_configuration;
use crate::Result;

/// Every payload the gateway publishes is a JSON document.
const CONTENT_TYPE: &str = "application/json";

/// Connection options of the configured protocol version.
#[derive(Clone)]
pub enum Options {
    V4(Box<rumqttc::MqttOptions>),
    V5(Box<rumqttc::v5::MqttOptions>),
}

/// The client handle of one connection.
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// What the link acts on, from either protocol.
#[derive(Debug)]
pub enum LinkEvent {
    /// The broker accepted the connection.
    Connected,
    /// A publish left with this packet id (QoS 1).
    Sent(u16),
    /// The broker took responsibility for the publish with this packet id.
    Acked(u16),
    /// An MQTT 5 broker acknowledged the publish with an error reason code: it did not
    /// take it.
    Refused { pkid: u16, reason: String },
    /// A message on a subscribed topic.
    Message { topic: String, payload: Bytes },
    /// Our DISCONNECT left.
    DisconnectSent,
    /// Nothing the link acts on.
    Other,
}

impl Options {
    pub fn new(
        config: &GatewayConfig,
        status_topic: String,
        status_offline: Vec<u8>,
    ) -> Result<Options> {
        let m = &config.mqtt;
        let client_id = m
            .client_id
            .clone()
            .unwrap_or_else(|| format!("neo-{}", m.device));
        let incoming = m.max_incoming_bytes.unwrap_or(m.max_packet_bytes);
        let transport = match &m.tls {
            Some(tls) => Some(Transport::tls_with_config(tls_configuration(tls)?)),
            None => None,
        };
        Ok(match m.protocol {
            Protocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(client_id, m.host.clone(), m.port);
                o.set_keep_alive(Duration::from_secs(m.keep_alive_s))
                    .set_clean_session(true)
                    .set_inflight(m.inflight)
                    .set_max_packet_size(incoming, m.max_packet_bytes)
                    .set_last_will(rumqttc::LastWill::new(
                        status_topic,
                        status_offline,
                        QoS::AtLeastOnce,
                        true,
                    ));
                if let Some(user) = &m.username {
                    o.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
                }
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                Options::V4(Box::new(o))
            }
            Protocol::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(client_id, m.host.clone(), m.port);
                let will_properties = m5::LastWillProperties {
                    delay_interval: None,
                    payload_format_indicator: Some(1),
                    message_expiry_interval: None,
                    content_type: Some(CONTENT_TYPE.into()),
                    response_topic: None,
                    correlation_data: None,
                    user_properties: Vec::new(),
                };
                // A clean start and a session that ends with the connection: the spool, not
                // the broker, keeps what is not yet delivered (see the link).
                o.set_keep_alive(Duration::from_secs(m.keep_alive_s))
                    .set_clean_start(true)
                    .set_session_expiry_interval(None)
                    .set_outgoing_inflight_upper_limit(m.inflight)
                    .set_max_packet_size(Some(incoming.min(u32::MAX as usize) as u32))
                    .set_last_will(m5::LastWill::new(
                        status_topic,
                        status_offline,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        true,
                        Some(will_properties),
                    ));
                if let Some(user) = &m.username {
                    o.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
                }
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                Options::V5(Box::new(o))
            }
        })
    }

    /// Opens a connection: a client handle and a task that polls its event loop, forwarding
    /// each event tagged with `epoch` and ending at the first error (sent as `Err`).
    pub fn connect(
        &self,
        cap: usize,
        epoch: u64,
        tx: mpsc::Sender<(u64, std::result::Result<LinkEvent, String>)>,
    ) -> (Client, tokio::task::JoinHandle<()>) {
        match self {
            Options::V4(o) => {
                let (client, mut eventloop) = rumqttc::AsyncClient::new((**o).clone(), cap);
                let task = tokio::spawn(async move {
                    loop {
                        let event = eventloop
                            .poll()
                            .await
                            .map(from_v4)
                            .map_err(|e| e.to_string());
                        let end = event.is_err();
                        if tx.send((epoch, event)).await.is_err() || end {
                            return;
                        }
                    }
                });
                (Client::V4(client), task)
            }
            Options::V5(o) => {
                let (client, mut eventloop) = rumqttc::v5::AsyncClient::new((**o).clone(), cap);
                let task = tokio::spawn(async move {
                    loop {
                        let event = eventloop
                            .poll()
                            .await
                            .map(from_v5)
                            .map_err(|e| e.to_string());
                        let end = event.is_err();
                        if tx.send((epoch, event)).await.is_err() || end {
                            return;
                        }
                    }
                });
                (Client::V5(client), task)
            }
        }
    }
}

fn from_v4(event: rumqttc::Event) -> LinkEvent {
    use rumqttc::{Event, Packet};
    match event {
        Event::Incoming(Packet::ConnAck(_)) => LinkEvent::Connected,
        Event::Incoming(Packet::PubAck(ack)) => LinkEvent::Acked(ack.pkid),
        Event::Incoming(Packet::Publish(p)) => LinkEvent::Message {
            topic: p.topic,
            payload: p.payload,
        },
        Event::Outgoing(o) => from_outgoing(o),
        _ => LinkEvent::Other,
    }
}

fn from_v5(event: rumqttc::v5::Event) -> LinkEvent {
    use m5::{Packet, PubAckReason};
    use rumqttc::v5::Event;
    match event {
        // rumqttc turns a refused CONNACK into an error, so this one is a success.
        Event::Incoming(Packet::ConnAck(_)) => LinkEvent::Connected,
        Event::Incoming(Packet::PubAck(ack)) => match ack.reason {
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                LinkEvent::Acked(ack.pkid)
            }
            reason => {
                let text = ack
                    .properties
                    .and_then(|p| p.reason_string)
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default();
                LinkEvent::Refused {
                    pkid: ack.pkid,
                    reason: format!("{reason:?}{text}"),
                }
            }
        },
        Event::Incoming(Packet::Publish(p)) => LinkEvent::Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
        },
        Event::Outgoing(o) => from_outgoing(o),
        _ => LinkEvent::Other,
    }
}

fn from_outgoing(o: Outgoing) -> LinkEvent {
    match o {
        Outgoing::Publish(pkid) => LinkEvent::Sent(pkid),
        Outgoing::Disconnect => LinkEvent::DisconnectSent,
        _ => LinkEvent::Other,
    }
}

fn json_properties() -> m5::PublishProperties {
    m5::PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some(CONTENT_TYPE.into()),
        ..Default::default()
    }
}

impl Client {
    /// Queues a QoS 1 publish; fails when the request channel is full.
    pub fn publish(
        &self,
        topic: String,
        retain: bool,
        payload: Vec<u8>,
    ) -> std::result::Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_publish(topic, QoS::AtLeastOnce, retain, payload)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_publish_with_properties(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    retain,
                    payload,
                    json_properties(),
                )
                .map_err(|e| e.to_string()),
        }
    }

    pub fn subscribe(&self, filter: String) -> std::result::Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_subscribe(filter, QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
        }
    }

    pub fn disconnect(&self) {
        let _ = match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}
