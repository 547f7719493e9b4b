# `nix flake check` boots this: a hub with NATS (JetStream) and the gateway, two machines running
# the agent from services.cbus-agent, and the CLI fanning out to them. The same story as
# tests/tests/devfleet.rs, with NixOS VMs instead of nspawn machines.
{ pkgs, self }:
pkgs.testers.runNixOSTest {
  name = "cbus-fleet";
  defaults.imports = [ self.nixosModules.default ];
  nodes = {
    hub = { pkgs, ... }: {
      services.nats = {
        enable = true;
        jetstream = true;
        host = "0.0.0.0";
      };
      networking.firewall.allowedTCPPorts = [ 4222 ];
      services.cbus-gateway = {
        enable = true;
        listenAddress = "127.0.0.1:8080";
        tokenFile = pkgs.writeText "cbus-gateway-token" "nixos-test-token";
      };
      environment.systemPackages = [ pkgs.cbus pkgs.curl ];
    };
    machine1 = import ./common.nix { natsUrl = "nats://hub:4222"; role = "web"; };
    machine2 = import ./common.nix { natsUrl = "nats://hub:4222"; role = "worker"; };
  };
  testScript = ''
    cbus = "cbus --nats-url nats://127.0.0.1:4222"
    start_all()
    hub.wait_for_unit("nats.service")
    hub.wait_for_open_port(4222)
    for m in (machine1, machine2):
        m.wait_for_unit("cbus-agent.service")
        m.wait_for_unit("cbus-demo-worker.service")

    with subtest("both agents are running, with their labels"):
        hub.wait_until_succeeds(f"test $({cbus} agents -s | grep -c running) -eq 2", timeout=60)
        hub.succeed(f"{cbus} --labels role=worker agents -s | grep -q machine2")

    with subtest("stop on one machine, start on all"):
        hub.succeed(f"{cbus} --hosts machine1 stop cbus-demo-worker.service")
        machine1.fail("systemctl is-active cbus-demo-worker.service")
        machine2.succeed("systemctl is-active cbus-demo-worker.service")
        hub.succeed(f"{cbus} start cbus-demo-worker.service")
        machine1.succeed("systemctl is-active cbus-demo-worker.service")

    with subtest("the gateway exports both machines' units"):
        hub.wait_for_unit("cbus-gateway.service")
        hub.wait_until_succeeds(
            "curl -sf http://127.0.0.1:8080/metrics | grep -q 'cbus_systemd_unit_state{host=\"machine2\",name=\"cbus-demo-worker.service\"'",
            timeout=60,
        )
  '';
}
