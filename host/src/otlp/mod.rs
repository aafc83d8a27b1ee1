//! OTLP encodings: the protobuf wire format read and written without decoding it
//! ([`wire`]), OTLP/JSON ([`json`]), a request's spans in the buffer's form ([`spans`]),
//! regrouping buffered spans into a request ([`regroup`]), and the `google.rpc.Status` error
//! body.

pub(crate) mod json;
pub(crate) mod regroup;
pub(crate) mod signal;
pub(crate) mod spans;
pub mod wire;

/// `google.rpc.Status` (google/rpc/status.proto): the payload of `grpc-status-details-bin`, and
/// the body of every OTLP/HTTP error response.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<ProtoAny>,
}

/// `google.protobuf.Any` (google/protobuf/any.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtoAny {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `google.rpc.RetryInfo` (google/rpc/error_details.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    pub(crate) retry_delay: Option<ProtoDuration>,
}

/// `google.protobuf.Duration` (google/protobuf/duration.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ProtoDuration {
    #[prost(int64, tag = "1")]
    pub(crate) seconds: i64,
    #[prost(int32, tag = "2")]
    pub(crate) nanos: i32,
}
