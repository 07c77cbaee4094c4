//! The real transport: the `a2` crate over HTTP/2 to Apple. Kept thin on purpose: a2's endpoint
//! is fixed to Apple's hosts and trusts only the public roots, so nothing here can be tested
//! against a local server. Everything it does besides calling a2 is the pure conversion
//! [`a2_payload`], which the unit tests (and the fake) check.

use std::{io::Read, time::Duration};

use a2::{
    Client, ClientConfig, Endpoint,
    request::{
        notification::{CollapseId, NotificationOptions, Priority, PushType},
        payload::PayloadLike,
    },
};

use crate::{
    contract::{VOIP_PRIORITY, VoipRequest},
    transport::{ApnsResponse, ApnsTransport, BoxFuture, TransportError},
};

/// Which APNs environment: production, or the sandbox that development builds register with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Environment {
    /// `api.push.apple.com`.
    #[default]
    Production,
    /// `api.development.push.apple.com`.
    Sandbox,
}

/// Sends through one a2 client: one pooled HTTP/2 connection, and one provider token (JWT, ES256)
/// that a2 signs once and reuses for 55 minutes, inside Apple's 20-60 minute window (refreshing
/// more often gets `429 TooManyProviderTokenUpdates`, older than an hour `403
/// ExpiredProviderToken`).
pub struct A2Transport {
    client: Client,
}

impl A2Transport {
    /// Token-based auth from a `.p8` key (PKCS#8 PEM), its key id and the team id.
    /// `request_timeout` bounds each request inside a2 (the bridge also bounds it by the ring
    /// time left).
    pub fn new(
        p8_pem: impl Read,
        key_id: &str,
        team_id: &str,
        environment: Environment,
        request_timeout: Duration,
    ) -> Result<Self, a2::Error> {
        let config = ClientConfig {
            endpoint: match environment {
                Environment::Production => Endpoint::Production,
                Environment::Sandbox => Endpoint::Sandbox,
            },
            request_timeout_secs: Some(request_timeout.as_secs().max(1)),
            // Keep the connection across quiet hours: Apple prefers long-lived connections.
            pool_idle_timeout_secs: Some(3600),
        };
        Ok(Self {
            client: Client::token(p8_pem, key_id, team_id, config)?,
        })
    }
}

impl ApnsTransport for A2Transport {
    fn send<'a>(&'a self, request: &'a VoipRequest) -> BoxFuture<'a, Result<ApnsResponse, TransportError>> {
        Box::pin(async move {
            match self.client.send(a2_payload(request)).await {
                Ok(r) => Ok(ApnsResponse {
                    status: r.code,
                    reason: None,
                    apns_id: r.apns_id,
                }),
                // a2 turns every non-200 into this error; its reason enum lacks some of Apple's
                // reasons (then `error` is None), so the status is what the bridge decides on.
                Err(a2::Error::ResponseError(r)) => Ok(ApnsResponse {
                    status: r.code,
                    reason: r.error.map(|e| format!("{:?}", e.reason)),
                    apns_id: r.apns_id,
                }),
                Err(a2::Error::RequestTimeout(secs)) => Err(TransportError::Timeout(secs * 1000)),
                Err(e @ (a2::Error::ConnectionError(_) | a2::Error::ClientError(_))) => {
                    Err(TransportError::Unreachable(e.to_string()))
                }
                Err(e) => Err(TransportError::Local(e.to_string())),
            }
        })
    }
}

/// A request in a2's terms: the options a2 turns into headers, the token for the path, and the
/// exact JSON body the contract checked (a2 would otherwise re-serialise it).
#[derive(Debug, Clone)]
pub struct A2Payload<'a> {
    options: NotificationOptions<'a>,
    device_token: &'a str,
    json: &'a str,
}

impl<'a> A2Payload<'a> {
    /// a2's notification options (what becomes the `apns-*` headers).
    pub fn options(&self) -> &NotificationOptions<'a> {
        &self.options
    }

    /// The headers a2 sends for these options, in the form it writes them (mirrors
    /// `a2::Client::build_request`, which is private): what APNs, and the fake, see.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let o = &self.options;
        let mut h = Vec::new();
        if let Some(p) = &o.apns_priority {
            h.push(("apns-priority", p.to_string()));
        }
        if let Some(id) = o.apns_id {
            h.push(("apns-id", id.to_string()));
        }
        if let Some(t) = &o.apns_push_type {
            h.push(("apns-push-type", t.to_string()));
        }
        if let Some(e) = &o.apns_expiration {
            h.push(("apns-expiration", e.to_string()));
        }
        if let Some(c) = &o.apns_collapse_id {
            h.push(("apns-collapse-id", c.value.to_string()));
        }
        if let Some(t) = o.apns_topic {
            h.push(("apns-topic", t.to_string()));
        }
        h
    }
}

impl serde::Serialize for A2Payload<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let value: serde_json::Value = serde_json::from_str(self.json).map_err(serde::ser::Error::custom)?;
        value.serialize(s)
    }
}

impl PayloadLike for A2Payload<'_> {
    fn to_json_string(&self) -> Result<String, a2::Error> {
        Ok(self.json.to_string())
    }

    fn get_device_token(&self) -> &str {
        self.device_token
    }

    fn get_options(&self) -> &NotificationOptions<'_> {
        &self.options
    }
}

/// Convert a contract-checked request into a2's payload and options.
pub fn a2_payload(request: &VoipRequest) -> A2Payload<'_> {
    debug_assert_eq!(VOIP_PRIORITY, 10, "a2's Priority::High is 10");
    A2Payload {
        options: NotificationOptions {
            apns_id: None,
            apns_push_type: Some(PushType::Voip),
            apns_expiration: Some(request.expiration()),
            apns_priority: Some(Priority::High),
            apns_topic: Some(request.topic()),
            // A call UUID: 36 bytes, within the 64 a2 (and APNs) allow.
            apns_collapse_id: Some(CollapseId {
                value: request.collapse_id(),
            }),
        },
        device_token: request.device_token().as_str(),
        json: request.payload(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        contract::{BundleId, DeviceToken, VoipCall},
        test_invite,
    };

    fn request() -> VoipRequest {
        let call = VoipCall::from_invite(test_invite("c1", 1_700_000_000_000, 1_700_000_030_700)).unwrap();
        call.request(
            &DeviceToken::parse(&"0f".repeat(32)).unwrap(),
            &BundleId::parse("com.example.ward").unwrap(),
            1_700_000_000_100,
            1000,
        )
        .unwrap()
    }

    #[test]
    fn a2_options_carry_the_voip_contract() {
        let req = request();
        let p = a2_payload(&req);
        let o = p.options();
        assert_eq!(o.apns_push_type, Some(PushType::Voip));
        assert!(matches!(o.apns_priority, Some(Priority::High)));
        assert_eq!(o.apns_topic, Some("com.example.ward.voip"));
        assert_eq!(o.apns_expiration, Some(1_700_000_030));
        assert_eq!(
            o.apns_collapse_id.as_ref().map(|c| c.value),
            Some(push_proto::call_uuid("c1").as_str())
        );
        // a2's own validation of the collapse id accepts it.
        assert!(CollapseId::new(req.collapse_id()).is_ok());
        assert_eq!(p.get_device_token(), "0f".repeat(32));
    }

    #[test]
    fn a2_sends_these_headers() {
        let req = request();
        let headers = a2_payload(&req).headers();
        let get = |k: &str| headers.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("apns-push-type"), Some("voip"));
        assert_eq!(get("apns-priority"), Some("10"));
        assert_eq!(get("apns-topic"), Some("com.example.ward.voip"));
        assert_eq!(get("apns-expiration"), Some("1700000030"));
        assert_eq!(
            get("apns-collapse-id"),
            Some(push_proto::call_uuid("c1").as_str())
        );
        assert_eq!(get("apns-id"), None, "APNs assigns it");
    }

    #[test]
    fn a2_body_is_the_checked_payload_byte_for_byte() {
        let req = request();
        let p = a2_payload(&req);
        assert_eq!(p.to_json_string().unwrap(), req.payload());
        // The Serialize impl a2 requires agrees with it.
        let via_serde: serde_json::Value = serde_json::to_value(&p).unwrap();
        assert_eq!(
            via_serde,
            serde_json::from_str::<serde_json::Value>(req.payload()).unwrap()
        );
    }

    #[test]
    fn client_builds_from_a_p8_key_without_network() {
        // A throwaway P-256 key in PKCS#8 PEM (a2's own test key): building the client signs
        // nothing and opens no connection.
        const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg8g/n6j9roKvnUkwu
lCEIvbDqlUhA5FOzcakkG90E8L+hRANCAATKS2ZExEybUvchRDuKBftotMwVEus3
jDwmlD1Gg0yJt1e38djFwsxsfr5q2hv0Rj9fTEqAPr8H7mGm0wKxZ7iQ
-----END PRIVATE KEY-----";
        assert!(
            A2Transport::new(
                KEY.as_bytes(),
                "89AFRD1X22",
                "ASDFQWERTY",
                Environment::Sandbox,
                Duration::from_secs(5)
            )
            .is_ok()
        );
        assert!(
            A2Transport::new(
                &b"not a key"[..],
                "k",
                "t",
                Environment::Production,
                Duration::from_secs(5)
            )
            .is_err()
        );
    }
}
