# Three NixOS test machines running the agent, like the original CBus's `run-test-machine`:
#
#   nix run .#dev-nats                      # terminal 1: NATS with JetStream on 127.0.0.1:4222
#   nix run .#run-test-machine -- cbus-1    # terminals 2..4: cbus-1, cbus-2, cbus-3 (QEMU)
#   nix run .#cbus -- agents                # the fleet
#
# QEMU's user network maps 10.0.2.2 to the host's loopback, where dev-nats listens. Log in on the
# console as root (password cbus) or `ssh -p 2221 root@127.0.0.1` (2222, 2223 for the others).
# The nspawn fleet of `./dev up` plays the same role on hosts without Nix or KVM.
{ nixpkgs, self, system ? "x86_64-linux" }:
let
  machine = index: nixpkgs.lib.nixosSystem {
    inherit system;
    modules = [
      self.nixosModules.default
      (import ./common.nix {
        natsUrl = "nats://10.0.2.2:4222";
        role = if index == 2 then "worker" else "web";
      })
      ({ modulesPath, ... }: {
        imports = [ "${modulesPath}/virtualisation/qemu-vm.nix" ];
        nixpkgs.overlays = [ self.overlays.default ];
        networking.hostName = "cbus-${toString index}";
        users.users.root.initialPassword = "cbus";
        services.openssh.settings.PermitRootLogin = "yes";
        virtualisation = {
          graphics = false;
          memorySize = 512;
          forwardPorts = [{ from = "host"; host.port = 2220 + index; guest.port = 22; }];
        };
      })
    ];
  };
in
{
  cbus-1 = machine 1;
  cbus-2 = machine 2;
  cbus-3 = machine 3;
}
