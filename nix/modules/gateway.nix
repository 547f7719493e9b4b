# services.cbus-gateway: dashboard, WebSocket API and Prometheus metrics for the whole fleet,
# served from a cache kept by NATS traffic.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.cbus-gateway;
  inherit (lib) mkEnableOption mkOption mkIf types optionals concatLists escapeShellArgs;
in
{
  options.services.cbus-gateway = {
    enable = mkEnableOption "the cbus gateway";
    package = mkOption {
      type = types.package;
      default = pkgs.cbus.gateway or (pkgs.callPackage ../package.nix { }).gateway;
      description = "Package providing bin/cbus-gateway.";
    };
    natsUrl = mkOption {
      type = types.str;
      default = "nats://127.0.0.1:4222";
      description = "NATS server URL(s).";
    };
    credentialsFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "NATS .creds file.";
    };
    listenAddress = mkOption {
      type = types.str;
      default = "127.0.0.1:8080";
      description = "Address of the dashboard (/), the WebSocket API (/ws) and /metrics.";
    };
    tokenFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "File holding the token dashboard and WebSocket clients must present (passed as a systemd credential). Without it the gateway generates one per start and logs it.";
    };
    allowOrigins = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Web origins besides the gateway's own that may open WebSockets.";
    };
    unitInclude = mkOption {
      type = types.str;
      default = ".+";
      description = "Units to export (anchored regex).";
    };
    unitExclude = mkOption {
      type = types.str;
      default = ".+\\.(automount|device|mount|scope|slice)";
      description = "Units not to export (anchored regex), node_exporter's default.";
    };
    logLevel = mkOption {
      type = types.str;
      default = "info";
      description = "RUST_LOG filter.";
    };
    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "More cbus-gateway flags.";
    };
  };

  config = mkIf cfg.enable {
    systemd.services.cbus-gateway = {
      description = "cbus gateway: fleet dashboard, WebSocket API and metrics from NATS";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      environment.RUST_LOG = cfg.logLevel;
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/cbus-gateway " + escapeShellArgs (concatLists [
          [ "--nats-url" cfg.natsUrl "--listen" cfg.listenAddress
            "--unit-include" cfg.unitInclude "--unit-exclude" cfg.unitExclude ]
          (optionals (cfg.credentialsFile != null) [ "--creds" (toString cfg.credentialsFile) ])
          (optionals (cfg.tokenFile != null) [ "--token-file" "%d/token" ])
          (concatLists (map (o: [ "--allow-origin" o ]) cfg.allowOrigins))
          cfg.extraArgs
        ]);
        DynamicUser = true;
        LoadCredential = optionals (cfg.tokenFile != null) [ "token:${toString cfg.tokenFile}" ];
        Restart = "always";
        RestartSec = 2;
      };
    };
  };
}
