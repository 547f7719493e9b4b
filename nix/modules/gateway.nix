# services.cbus-gateway: the fleet's dashboard, WebSocket API and Prometheus /metrics, served from
# a cache that NATS traffic keeps current.
#
# Every option maps to one cbus-gateway flag (see `cbus-gateway --help`); keep the two in sync.
# Secrets (NATS credentials, client token, TLS key) are handed over with systemd's LoadCredential,
# so the service runs as a dynamic user and they never enter the Nix store.
{ config, lib, pkgs, utils, ... }:
let
  cfg = config.services.cbus-gateway;
  inherit (lib) mkEnableOption mkOption mkIf types optional optionals concatLists
    literalExpression;
  secretPath = types.nullOr (types.either types.path types.str);
  # Flag pointing at a credential that systemd copies into $CREDENTIALS_DIRECTORY (%d).
  credFlag = flag: name: file: optionals (file != null) [ flag "%d/${name}" ];
  credential = name: file: optional (file != null) "${name}:${toString file}";
  escape = utils.escapeSystemdExecArgs;
  port = lib.toInt (lib.last (lib.splitString ":" cfg.listenAddress));
  lowPort = port < 1024;
in
{
  options.services.cbus-gateway = {
    enable = mkEnableOption "the cbus gateway (dashboard, WebSocket API and Prometheus metrics)";

    package = mkOption {
      type = types.package;
      default = pkgs.cbus.gateway or (pkgs.callPackage ../package.nix { }).gateway;
      defaultText = literalExpression "pkgs.cbus.gateway";
      description = "Package providing bin/cbus-gateway.";
    };

    # --- NATS side ---
    natsUrl = mkOption {
      type = types.either types.str (types.listOf types.str);
      default = "nats://127.0.0.1:4222";
      description = "NATS server URL, or several (`--nats-url`, comma-separated).";
    };
    credentialsFile = mkOption {
      type = secretPath;
      default = null;
      example = "/run/keys/cbus-gateway.creds";
      description = "NATS `.creds` file, user JWT and seed (`--creds`). Give a path outside the Nix store.";
    };
    nkeyFile = mkOption {
      type = secretPath;
      default = null;
      example = "/run/keys/cbus-gateway.nk";
      description = ''
        File holding an nkey seed (`SU...`) to authenticate to NATS with (`--nkey`), passed as a
        systemd credential. Give a path outside the Nix store.
      '';
    };
    environmentFile = mkOption {
      type = secretPath;
      default = null;
      example = "/run/keys/cbus-gateway.env";
      description = ''
        Environment file with NATS secrets that must not enter the Nix store:
        `NATS_USER=` and `NATS_PASSWORD=`, or `NATS_TOKEN=`.
      '';
    };
    tlsCaFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "CA certificate of a NATS server with TLS (`--tls-ca`).";
    };

    # --- client side ---
    listenAddress = mkOption {
      type = types.str;
      default = "127.0.0.1:8080";
      example = "0.0.0.0:8443";
      description = "Address of the dashboard, /ws and /metrics (`--listen`).";
    };
    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the port of {option}`listenAddress` in the firewall.";
    };
    tokenFile = mkOption {
      type = secretPath;
      default = null;
      example = "/run/keys/cbus-gateway.token";
      description = ''
        File whose first line is the token dashboard and WebSocket clients must present
        (`--token-file`). Without it the gateway makes one up at start and writes it to
        /run/cbus-gateway/client-token (mode 0600, readable by root), never to the journal.
      '';
    };
    tls = {
      certFile = mkOption {
        type = secretPath;
        default = null;
        description = "TLS certificate chain, PEM (`--tls-cert`).";
      };
      keyFile = mkOption {
        type = secretPath;
        default = null;
        description = "TLS private key, PEM (`--tls-key`). Give a path outside the Nix store.";
      };
      selfSigned = mkOption {
        type = types.bool;
        default = false;
        description = "Serve TLS with a certificate generated at start (`--self-signed`).";
      };
    };
    allowOrigins = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "https://ops.example" ];
      description = "Origins besides the gateway's own allowed to open a WebSocket (`--allow-origin`).";
    };
    allowHosts = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "cbus.example" ];
      description = ''
        Names clients reach the gateway as (the Host header, `--allow-host`), besides IP addresses,
        localhost, the machine's hostname and the hosts of {option}`allowOrigins`. Requests under
        other names get 421 (DNS rebinding).
      '';
    };
    maxConnections = mkOption {
      type = types.ints.positive;
      default = 8192;
      description = "Client connections open at once at most (`--max-connections`); keep it below LimitNOFILE.";
    };

    # --- what it follows ---
    unitInclude = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "(nginx|postgresql).*";
      description = "Units to follow and export, an anchored regex (`--unit-include`; default: all).";
    };
    unitExclude = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = ".+\\.(automount|device|mount|scope|slice)";
      description = "Units not to follow, an anchored regex (`--unit-exclude`; default: node_exporter's).";
    };

    logLevel = mkOption {
      type = types.str;
      default = "info";
      description = "`RUST_LOG` filter.";
    };
    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "More cbus-gateway flags.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = (cfg.tls.certFile == null) == (cfg.tls.keyFile == null);
        message = "services.cbus-gateway: set both tls.certFile and tls.keyFile, or neither.";
      }
      {
        assertion = !(cfg.tls.selfSigned && cfg.tls.certFile != null);
        message = "services.cbus-gateway: tls.selfSigned and tls.certFile exclude each other.";
      }
    ];

    networking.firewall.allowedTCPPorts = optional cfg.openFirewall port;

    systemd.services.cbus-gateway = {
      description = "cbus gateway: fleet dashboard, WebSocket API and metrics from NATS";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" "nats.service" ];
      wants = [ "network-online.target" ];
      environment.RUST_LOG = cfg.logLevel;
      serviceConfig = {
        # %d is systemd's credentials directory: kept unescaped, everything else escaped.
        ExecStart = lib.concatStringsSep " " ([
          (escape (concatLists [
            [ "${cfg.package}/bin/cbus-gateway" ]
            [ "--nats-url" (lib.concatStringsSep "," (lib.toList cfg.natsUrl)) ]
            [ "--listen" cfg.listenAddress ]
            (optionals (cfg.tlsCaFile != null) [ "--tls-ca" (toString cfg.tlsCaFile) ])
            (optional cfg.tls.selfSigned "--self-signed")
            (concatLists (map (o: [ "--allow-origin" o ]) cfg.allowOrigins))
            (concatLists (map (h: [ "--allow-host" h ]) cfg.allowHosts))
            [ "--max-connections" (toString cfg.maxConnections) ]
            (optionals (cfg.unitInclude != null) [ "--unit-include" cfg.unitInclude ])
            (optionals (cfg.unitExclude != null) [ "--unit-exclude" cfg.unitExclude ])
            cfg.extraArgs
          ]))
        ] ++ concatLists [
          (credFlag "--creds" "nats.creds" cfg.credentialsFile)
          (credFlag "--nkey" "nats.nk" cfg.nkeyFile)
          (credFlag "--token-file" "token" cfg.tokenFile)
          (credFlag "--tls-cert" "tls.crt" cfg.tls.certFile)
          (credFlag "--tls-key" "tls.key" cfg.tls.keyFile)
        ]);
        LoadCredential = concatLists [
          (credential "nats.creds" cfg.credentialsFile)
          (credential "nats.nk" cfg.nkeyFile)
          (credential "token" cfg.tokenFile)
          (credential "tls.crt" cfg.tls.certFile)
          (credential "tls.key" cfg.tls.keyFile)
        ];
        EnvironmentFile = optional (cfg.environmentFile != null) (toString cfg.environmentFile);
        DynamicUser = true;
        # A generated client token goes to $RUNTIME_DIRECTORY/client-token (0600), not the journal.
        RuntimeDirectory = "cbus-gateway";
        RuntimeDirectoryMode = "0700";
        # Each client is a descriptor: the default 1,024 let 1,100 idle sockets lock it out. The
        # gateway raises its soft limit to this at start.
        LimitNOFILE = 65536;
        Restart = "always";
        RestartSec = 2;
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
        # No capabilities, but the one a port below 1024 needs.
        CapabilityBoundingSet = if lowPort then "CAP_NET_BIND_SERVICE" else "";
        AmbientCapabilities = optional lowPort "CAP_NET_BIND_SERVICE";
      };
    };
  };
}
