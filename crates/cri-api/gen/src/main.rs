//! `cri-api-gen API_PROTO OUT_DIR`: the code generator `gen.sh` runs (not part of any build).
//!
//! Writes into OUT_DIR `runtime.v1.rs` (tonic-prost-build: the prost messages, the clients and
//! the servers with default stubs) and `runtime.v1.serde.rs` (pbjson-build: serde for every
//! message and enum, in the proto3 JSON mapping).

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args_os().skip(1);
    let (Some(proto), Some(out), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: cri-api-gen API_PROTO OUT_DIR");
        std::process::exit(2);
    };
    let (proto, out) = (PathBuf::from(proto), PathBuf::from(out));
    let include = proto.parent().expect("api.proto's directory").to_path_buf();
    // Outside OUT_DIR, whose every file gen.sh takes as output.
    let descriptors = include.join("runtime.v1.descriptors");

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .generate_default_stubs(true)
        .skip_debug(["runtime.v1.AuthConfig"])
        .file_descriptor_set_path(&descriptors)
        .out_dir(&out)
        .compile_protos(&[&proto], &[&include])
        .expect("tonic-prost-build failed");

    // Deserializing takes both the proto field names and lowerCamelCase, and enums by name or
    // number; an unknown field or enum value is an error. Serializing writes what crictl reads
    // (Go's JSON of the CRI types): proto field names, enums as numbers.
    let descriptors = std::fs::read(&descriptors).expect("reading the descriptor set");
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)
        .expect("decoding the descriptor set")
        .preserve_proto_field_names()
        .use_integers_for_enums()
        .out_dir(&out)
        .build(&[".runtime.v1"])
        .expect("pbjson-build failed");
}
