//! The CSI Identity service: who the plugin is, what it offers, whether it is ready.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Plugin;
use crate::proto::identity_server::Identity;
use crate::proto::plugin_capability::{self, service, volume_expansion};
use crate::proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// Identity service over the shared plugin state.
#[derive(Debug, Clone)]
pub struct IdentityService(pub Arc<Plugin>);

fn service(kind: service::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service {
                r#type: kind as i32,
            },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        self.0
            .call("GetPluginInfo", async {
                Ok(GetPluginInfoResponse {
                    name: self.0.driver_name.clone(),
                    vendor_version: concat!(env!("CARGO_PKG_VERSION"), "+", env!("LANES_COMMIT"))
                        .to_owned(),
                    manifest: Default::default(),
                })
            })
            .await
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        self.0
            .call("GetPluginCapabilities", async {
                let mut capabilities = vec![service(service::Type::VolumeAccessibilityConstraints)];
                if self.0.roles.controller {
                    capabilities.push(service(service::Type::ControllerService));
                }
                capabilities.push(PluginCapability {
                    r#type: Some(plugin_capability::Type::VolumeExpansion(
                        plugin_capability::VolumeExpansion {
                            r#type: volume_expansion::Type::Online as i32,
                        },
                    )),
                });
                Ok(GetPluginCapabilitiesResponse { capabilities })
            })
            .await
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        self.0
            .call("Probe", async {
                // Every lane answers within its deadline, so a hung disk makes Probe fail
                // rather than hang. No profile is named: a shared lane's file systems are
                // not this plugin's health (an unreachable one fails its own calls).
                for lane in self.0.controllers.all() {
                    lane.capacity("", None).await.map_err(|e| {
                        Status::failed_precondition(format!(
                            "the {} lane is not usable: {e}",
                            lane.kind()
                        ))
                    })?;
                }
                Ok(ProbeResponse { ready: Some(true) })
            })
            .await
    }
}
