{
  description = "cbus: clustered D-Bus over NATS (agent, CLI, gateway)";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    flake-utils.url = "github:numtide/flake-utils";
  };

  outputs = { self, nixpkgs, flake-utils }:
    let
      overlay = final: prev: {
        cbus = final.callPackage ./nix/package.nix { };
      };
    in
    {
      overlays.default = overlay;

      # services.cbus-agent and services.cbus-gateway; `default` has both.
      nixosModules = {
        cbus-agent = import ./nix/modules/agent.nix;
        cbus-gateway = import ./nix/modules/gateway.nix;
        cbus-nats = import ./nix/modules/nats.nix;
        default = { imports = [ ./nix/modules/agent.nix ./nix/modules/gateway.nix ./nix/modules/nats.nix ]; };
      };

      # Three NixOS test machines running the agent, like the original CBus dev setup:
      # `nix run .#dev-nats`, then `nix run .#run-test-machine -- cbus-1` (and cbus-2, cbus-3).
      nixosConfigurations = import ./nix/dev/machines.nix { inherit nixpkgs self; };
    }
    // flake-utils.lib.eachSystem [ "x86_64-linux" "aarch64-linux" ] (system:
      let
        pkgs = import nixpkgs { inherit system; overlays = [ overlay ]; };
        script = name: text: {
          type = "app";
          program = toString (pkgs.writeShellScript name text);
        };
      in
      {
        packages = {
          cbus = pkgs.cbus;
          cbus-agent = pkgs.cbus.agent;
          cbus-gateway = pkgs.cbus.gateway;
          default = pkgs.cbus;
        };

        apps = {
          default = { type = "app"; program = "${pkgs.cbus}/bin/cbus"; };
          cbus = { type = "app"; program = "${pkgs.cbus}/bin/cbus"; };
          cbus-agent = { type = "app"; program = "${pkgs.cbus.agent}/bin/cbus-agent"; };
          cbus-gateway = { type = "app"; program = "${pkgs.cbus.gateway}/bin/cbus-gateway"; };

          # A local NATS with JetStream for the dev VMs, which reach the host's loopback at
          # 10.0.2.2. Open (no users) and on 127.0.0.1 only; state in .dev/nix-nats.
          dev-nats = script "cbus-dev-nats" ''
            set -euo pipefail
            mkdir -p .dev/nix-nats
            echo "NATS for the dev VMs on nats://127.0.0.1:4222; the CLI: nix run .#cbus -- agents" >&2
            exec ${pkgs.nats-server}/bin/nats-server -a 127.0.0.1 -p 4222 -js -sd .dev/nix-nats/js
          '';

          # Boots one of the dev VMs (cbus-1, cbus-2, cbus-3) on the console; Ctrl-A X quits.
          run-test-machine = script "cbus-run-test-machine" ''
            set -euo pipefail
            name=''${1:-cbus-1}
            case "$name" in
              cbus-1|cbus-2|cbus-3) ;;
              *) echo "usage: nix run .#run-test-machine -- cbus-1|cbus-2|cbus-3" >&2; exit 2 ;;
            esac
            vm=$(nix build --no-link --print-out-paths "path:${self}#nixosConfigurations.$name.config.system.build.vm")
            mkdir -p .dev/nixos
            export NIX_DISK_IMAGE=$PWD/.dev/nixos/$name.qcow2
            exec "$vm/bin/run-$name-vm"
          '';
        };

        devShells.default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            rust-analyzer
            pkg-config
            nats-server
            natscli
            nsc
            dbus
            prometheus
            python3
            shellcheck
          ];
          shellHook = ''
            echo "cbus: ./dev test runs every check; ./dev up starts a local fleet (root, Linux)" >&2
          '';
        };

        formatter = pkgs.nixpkgs-fmt;

        checks = {
          cbus = pkgs.cbus;
          nixos-fleet = import ./nix/dev/test.nix { inherit pkgs self; };
        };
      });
}
