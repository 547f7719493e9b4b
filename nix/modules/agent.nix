# services.cbus-agent: bridges this host's D-Bus to NATS.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.cbus-agent;
  inherit (lib) mkEnableOption mkOption mkIf types optional optionals concatLists mapAttrsToList escapeShellArgs;
in
{
  options.services.cbus-agent = {
    enable = mkEnableOption "the cbus agent";
    package = mkOption {
      type = types.package;
      default = pkgs.cbus.agent or (pkgs.callPackage ../package.nix { }).agent;
      description = "Package providing bin/cbus-agent.";
    };
    natsUrl = mkOption {
      type = types.str;
      default = "nats://127.0.0.1:4222";
      description = "NATS server URL(s), comma-separated.";
    };
    nkeyAuth = mkOption {
      type = types.bool;
      default = true;
      description = "Authenticate to NATS with the nkey derived from the SSH host key.";
    };
    credentialsFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "NATS .creds file (user JWT and seed), instead of nkey authentication.";
    };
    hostKeyFile = mkOption {
      type = types.path;
      default = "/etc/ssh/ssh_host_ed25519_key";
      description = "SSH ed25519 host key the agent's identity (nkey) is derived from.";
    };
    bus = mkOption {
      type = types.str;
      default = "system";
      description = "system, user, or a D-Bus address.";
    };
    policyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "TOML policy of what may be set or called remotely (read-only when null).";
    };
    labels = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = { role = "web"; };
      description = "Labels reported in presence, for targeting.";
    };
    logLevel = mkOption {
      type = types.str;
      default = "info";
      description = "RUST_LOG filter.";
    };
    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "More cbus-agent flags.";
    };
  };

  config = mkIf cfg.enable {
    systemd.services.cbus-agent = {
      description = "cbus agent: bridges this host's D-Bus to NATS";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" "dbus.service" ];
      wants = [ "network-online.target" ];
      environment.RUST_LOG = cfg.logLevel;
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/cbus-agent " + escapeShellArgs (concatLists [
          [ "--nats-url" cfg.natsUrl "--host-key" (toString cfg.hostKeyFile) "--bus" cfg.bus ]
          (optional cfg.nkeyAuth "--nats-nkey-auth")
          (optionals (cfg.credentialsFile != null) [ "--creds" (toString cfg.credentialsFile) ])
          (optionals (cfg.policyFile != null) [ "--policy" (toString cfg.policyFile) ])
          (concatLists (mapAttrsToList (k: v: [ "--label" "${k}=${v}" ]) cfg.labels))
          cfg.extraArgs
        ]);
        Restart = "always";
        RestartSec = 2;
      };
    };
  };
}
