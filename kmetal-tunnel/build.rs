//! Generates the Konnectivity messages and services from `proto/konnectivity.proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/konnectivity.proto");
    tonic_prost_build::configure()
        // The generated `AgentServiceClient::connect(dst)` constructor would clash with the
        // `Connect` rpc; channels are built by the agent itself.
        .build_transport(false)
        .bytes(".")
        .compile_protos(&["proto/konnectivity.proto"], &["proto"])?;
    Ok(())
}
