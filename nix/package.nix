# All cbus binaries from the workspace; `agent` and `gateway` are thin outputs for one binary each.
{ lib, rustPlatform, runCommand }:
let
  cbus = rustPlatform.buildRustPackage {
    pname = "cbus";
    version = "0.1.0";
    src = lib.cleanSource ../.;
    cargoLock.lockFile = ../Cargo.lock;
    cargoBuildFlags = [ "--workspace" "--bins" ];
    # The integration tests boot systemd machines and need root; run them with ./dev test.
    doCheck = false;
    postInstall = ''
      rm -f $out/bin/cbus-test-service
      install -Dm644 agent/cbus-agent.service $out/lib/systemd/system/cbus-agent.service
      install -Dm644 agent/policy.example.toml $out/share/cbus/policy.example.toml
    '';
    meta = {
      description = "Clustered D-Bus over NATS: agent, CLI and gateway";
      license = lib.licenses.mit;
      mainProgram = "cbus";
      platforms = lib.platforms.linux;
    };
  };
  only = name: runCommand "${name}-${cbus.version}" { meta.mainProgram = name; } ''
    install -Dm755 ${cbus}/bin/${name} $out/bin/${name}
  '';
in
cbus // {
  agent = only "cbus-agent";
  gateway = only "cbus-gateway";
}
