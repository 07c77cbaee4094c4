//! A gRPC client for the sender and admin API over TLS, with the API key attached to every
//! call. Used by the CLI and the tests.

use std::net::SocketAddr;

use anyhow::Context;
use push_proto::sender::{push_admin_client::PushAdminClient, push_sender_client::PushSenderClient};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig},
};

/// Adds `authorization: Bearer <key>` to each request.
#[derive(Clone)]
pub struct BearerKey(MetadataValue<Ascii>);

impl tonic::service::Interceptor for BearerKey {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Sender API client with the key attached.
pub type SenderClient = PushSenderClient<InterceptedService<Channel, BearerKey>>;
/// Admin API client with the key attached.
pub type AdminClient = PushAdminClient<InterceptedService<Channel, BearerKey>>;

/// One connection to the API, from which both clients are made.
#[derive(Clone)]
pub struct ApiClient {
    channel: Channel,
    key: BearerKey,
}

impl ApiClient {
    /// Connect over TLS, trusting `ca_pem` and verifying `server_name`.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        ca_pem: &str,
        api_key: &str,
    ) -> anyhow::Result<Self> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name(server_name);
        let channel = Channel::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect()
            .await
            .with_context(|| format!("cannot reach the API at {addr}"))?;
        let key = MetadataValue::try_from(format!("Bearer {api_key}"))
            .context("API key is not valid header text")?;
        Ok(Self {
            channel,
            key: BearerKey(key),
        })
    }

    /// The underlying channel (for health checks and reflection).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// A sender API client.
    pub fn sender(&self) -> SenderClient {
        PushSenderClient::with_interceptor(self.channel.clone(), self.key.clone())
    }

    /// An admin API client.
    pub fn admin(&self) -> AdminClient {
        PushAdminClient::with_interceptor(self.channel.clone(), self.key.clone())
    }
}
