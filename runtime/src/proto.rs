//! The generated gRPC types of proto/legion.proto.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("legion.v1");
