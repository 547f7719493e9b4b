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
      nixosModules = {
        cbus-agent = import ./nix/modules/agent.nix;
        cbus-gateway = import ./nix/modules/gateway.nix;
        default = { imports = [ ./nix/modules/agent.nix ./nix/modules/gateway.nix ]; };
      };
      # Three NixOS test machines running the agent, like the original CBus dev setup.
      nixosConfigurations = import ./nix/dev/machines.nix { inherit nixpkgs self; };
    }
    // flake-utils.lib.eachSystem [ "x86_64-linux" "aarch64-linux" ] (system:
      let
        pkgs = import nixpkgs { inherit system; overlays = [ overlay ]; };
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
          # A local NATS with JetStream for the dev machines (they reach it on 10.0.2.2:4222).
          dev-nats = {
            type = "app";
            program = toString (pkgs.writeShellScript "cbus-dev-nats" ''
              mkdir -p .dev/nats
              exec ${pkgs.nats-server}/bin/nats-server -a 0.0.0.0 -p 4222 -js -sd .dev/nats/js
            '');
          };
          run-test-machine = {
            type = "app";
            program = toString (pkgs.writeShellScript "cbus-run-test-machine" ''
              name=''${1:-cbus-1}
              exec nix run ".#nixosConfigurations.$name.config.system.build.vm"
            '');
          };
        };
        devShells.default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            pkg-config
            nats-server
            natscli
            nsc
            dbus
            prometheus
          ];
        };
        checks.cbus = pkgs.cbus;
      });
}
