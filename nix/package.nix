# All cbus binaries from the workspace (cbus, cbus-agent, cbus-gateway); `agent` and `gateway`
# are thin outputs holding one binary each, for machines that need only that one.
{ lib, rustPlatform, runCommand }:
let
  root = ../.;
  # The sources cargo needs: no .dev (the dev fleet's state and machine overlays), no target.
  src = lib.cleanSourceWith {
    src = lib.cleanSource root;
    filter = path: type:
      let rel = lib.removePrefix (toString root + "/") (toString path);
      in !(lib.elem rel [ ".dev" "target" "result" "node_modules" ]);
  };
  cbus = rustPlatform.buildRustPackage {
    pname = "cbus";
    version = (lib.importTOML ../Cargo.toml).workspace.package.version;
    inherit src;
    cargoLock.lockFile = ../Cargo.lock;
    cargoBuildFlags = [ "--workspace" "--bins" ];
    # The integration tests need root, nats-server and systemd-nspawn: run them with ./dev test.
    doCheck = false;
    postInstall = ''
      # Test and benchmark helpers of the tests crate are not part of the package.
      rm -f $out/bin/cbus-test-service $out/bin/cbus-bench
      install -Dm644 agent/cbus-agent.service $out/lib/systemd/system/cbus-agent.service
      substituteInPlace $out/lib/systemd/system/cbus-agent.service \
        --replace-fail /usr/local/bin/cbus-agent $out/bin/cbus-agent
      install -Dm644 agent/policy.example.toml $out/share/cbus/policy.example.toml
    '';
    meta = {
      description = "Clustered D-Bus over NATS: agent, CLI and gateway";
      license = lib.licenses.mit;
      mainProgram = "cbus";
      platforms = lib.platforms.linux;
    };
  };
  only = name: runCommand "${name}-${cbus.version}"
    { meta = cbus.meta // { mainProgram = name; }; } ''
    install -Dm755 ${cbus}/bin/${name} $out/bin/${name}
  '';
in
cbus // {
  agent = only "cbus-agent";
  gateway = only "cbus-gateway";
}
