//! OTLP encodings: the protobuf wire format read and written without decoding it
//! ([`wire`]), OTLP/JSON ([`json`]), and the `google.rpc.Status` error body.

pub mod json;
pub mod wire;

/// `google.rpc.Status`, the body of every OTLP/HTTP error response.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types_any::Any>,
}

/// `google.protobuf.Any`, declared here to avoid a dependency for one message.
pub mod prost_types_any {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }
}
