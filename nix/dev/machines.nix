# Three NixOS test machines running the agent against the host's NATS (`nix run .#dev-nats`),
# reachable from QEMU's user network at 10.0.2.2. Start one with `nix run .#run-test-machine cbus-1`.
{ nixpkgs, self }:
let
  machine = name: nixpkgs.lib.nixosSystem {
    system = "x86_64-linux";
    modules = [
      self.nixosModules.cbus-agent
      ({ pkgs, modulesPath, ... }: {
        imports = [ "${modulesPath}/virtualisation/qemu-vm.nix" ];
        nixpkgs.overlays = [ self.overlays.default ];
        networking.hostName = name;
        services.openssh.enable = true;
        services.cbus-agent = {
          enable = true;
          natsUrl = "nats://10.0.2.2:4222";
          # The dev NATS has no users; production uses nkey auth (the default).
          nkeyAuth = false;
          labels.env = "dev";
          policyFile = pkgs.writeText "policy.toml" ''
            [[allow]]
            ops = ["call"]
            destination = "org.freedesktop.systemd1"
            interface = "org.freedesktop.systemd1.Manager"
            member = "{Start,Stop,Restart,Reload}Unit"
          '';
        };
        users.users.root.initialPassword = "cbus";
        virtualisation.graphics = false;
        system.stateVersion = "24.11";
      })
    ];
  };
in
{
  cbus-1 = machine "cbus-1";
  cbus-2 = machine "cbus-2";
  cbus-3 = machine "cbus-3";
}
