//! The Flight service as served: [`AirlockService`] behind a thin wrapper that turns the
//! Flight SQL dispatcher's decoding failures into the client's error.
//!
//! arrow-flight's generic `FlightService` implementation for a `FlightSqlService` decodes
//! tickets, descriptors and action bodies itself, and reports a protobuf that decodes as
//! an `Any` but not as the command it names as `Internal` (`ParseError(...)`). A
//! malformed message is the client's fault: the wrapper answers those with
//! `InvalidArgument`, through the one mapping in `crate::error`. Everything else passes
//! through unchanged.

use std::sync::Arc;

use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo, HandshakeRequest, PollInfo,
    SchemaResult, Ticket,
};
use tonic::{Code, Request, Response, Status, Streaming};

use super::{AirlockService, RequestId};
use crate::error::Error;

/// [`AirlockService`] as served.
#[derive(Debug, Clone)]
pub struct Guarded(pub Arc<AirlockService>);

/// A decoding failure of the dispatcher (see the module documentation), as the client's
/// error; any other status unchanged.
fn client_fault(status: Status, rid: &RequestId) -> Status {
    let decoding = status.code() == Code::Internal && status.message().starts_with("ParseError(");
    if decoding {
        Error::InvalidRequest(
            "malformed request: the ticket, command or action body is not a valid Flight SQL message".into(),
        )
        .into_status(rid)
    } else {
        status
    }
}

type Svc = AirlockService;

#[tonic::async_trait]
impl FlightService for Guarded {
    type HandshakeStream = <Svc as FlightService>::HandshakeStream;
    type ListFlightsStream = <Svc as FlightService>::ListFlightsStream;
    type DoGetStream = <Svc as FlightService>::DoGetStream;
    type DoPutStream = <Svc as FlightService>::DoPutStream;
    type DoActionStream = <Svc as FlightService>::DoActionStream;
    type ListActionsStream = <Svc as FlightService>::ListActionsStream;
    type DoExchangeStream = <Svc as FlightService>::DoExchangeStream;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        let rid = RequestId::of(&request);
        FlightService::handshake(self.0.as_ref(), request)
            .await
            .map_err(|s| client_fault(s, &rid))
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        FlightService::list_flights(self.0.as_ref(), request).await
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let rid = RequestId::of(&request);
        FlightService::get_flight_info(self.0.as_ref(), request)
            .await
            .map_err(|s| client_fault(s, &rid))
    }

    async fn poll_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        let rid = RequestId::of(&request);
        FlightService::poll_flight_info(self.0.as_ref(), request)
            .await
            .map_err(|s| client_fault(s, &rid))
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        let rid = RequestId::of(&request);
        FlightService::get_schema(self.0.as_ref(), request)
            .await
            .map_err(|s| client_fault(s, &rid))
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let rid = RequestId::of(&request);
        FlightService::do_get(self.0.as_ref(), request)
            .await
            .map_err(|s| client_fault(s, &rid))
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        let rid = RequestId::of(&request);
        FlightService::do_put(self.0.as_ref(), request)
            .await
            .map_err(|s| client_fault(s, &rid))
    }

    async fn do_exchange(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        FlightService::do_exchange(self.0.as_ref(), request).await
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let rid = RequestId::of(&request);
        FlightService::do_action(self.0.as_ref(), request)
            .await
            .map_err(|s| client_fault(s, &rid))
    }

    async fn list_actions(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        FlightService::list_actions(self.0.as_ref(), request).await
    }
}
