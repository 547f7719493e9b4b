# services.cbus-agent: bridges this host's D-Bus (system bus by default) to NATS.
#
# Every option maps to one cbus-agent flag (see `cbus-agent --help`); keep the two in sync.
# The agent runs as root: it watches the system bus as a monitor (BecomeMonitor is root-only)
# and reads the SSH host key its identity (nkey) comes from.
{ config, lib, pkgs, utils, ... }:
let
  cfg = config.services.cbus-agent;
  inherit (lib) mkEnableOption mkOption mkIf types optional optionals concatLists
    mapAttrsToList literalExpression;
  toml = pkgs.formats.toml { };
  policyFile =
    if cfg.policyFile != null then cfg.policyFile
    else if cfg.policy != { } then toml.generate "cbus-agent-policy.toml" cfg.policy
    else null;
  secretPath = types.nullOr (types.either types.path types.str);
in
{
  options.services.cbus-agent = {
    enable = mkEnableOption "the cbus agent, which bridges this host's D-Bus to NATS";

    package = mkOption {
      type = types.package;
      default = pkgs.cbus.agent or (pkgs.callPackage ../package.nix { }).agent;
      defaultText = literalExpression "pkgs.cbus.agent";
      description = "Package providing bin/cbus-agent.";
    };

    natsUrl = mkOption {
      type = types.either types.str (types.listOf types.str);
      default = "nats://127.0.0.1:4222";
      example = [ "tls://nats-1.example:4222" "tls://nats-2.example:4222" ];
      description = "NATS server URL, or several (`--nats-url`, comma-separated).";
    };

    jsDomain = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "hub";
      description = ''
        The JetStream domain that holds the registry (`--js-domain`), for a machine at a site
        whose leaf node has no JetStream: the hub's `services.cbus-nats.jetstream.domain`.
      '';
    };

    # --- how the agent authenticates to NATS (at most one besides nkeyAuth) ---
    nkeyAuth = mkOption {
      type = types.bool;
      default = cfg.credentialsFile == null && cfg.nkeyFile == null;
      defaultText = literalExpression
        "config.services.cbus-agent.credentialsFile == null && config.services.cbus-agent.nkeyFile == null";
      description = ''
        Authenticate to NATS with the nkey derived from {option}`hostKeyFile` (`--nats-nkey-auth`).
        The server needs a user for that nkey: `cbus keyscan HOST` or `cbus nkey KEY.pub` prints it.
      '';
    };
    credentialsFile = mkOption {
      type = secretPath;
      default = null;
      example = "/run/keys/cbus-agent.creds";
      description = ''
        NATS `.creds` file holding a user JWT and its nkey seed (`--creds`), for servers in
        operator/JWT mode. Give a path outside the Nix store.
      '';
    };
    nkeyFile = mkOption {
      type = secretPath;
      default = null;
      example = "/run/keys/cbus-agent.nk";
      description = ''
        File holding an nkey seed (`SU...`) to authenticate to NATS with (`--nkey`), instead of
        the host key's nkey ({option}`nkeyAuth`). Give a path outside the Nix store.
      '';
    };
    environmentFile = mkOption {
      type = secretPath;
      default = null;
      example = "/run/keys/cbus-agent.env";
      description = ''
        Environment file for secrets that must not enter the Nix store:
        `NATS_USER=` and `NATS_PASSWORD=`, or `NATS_TOKEN=`.
      '';
    };
    tlsCaFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "CA certificate of a NATS server with TLS (`--tls-ca`).";
    };

    # --- identity ---
    hostKeyFile = mkOption {
      type = types.str;
      default = "/etc/ssh/ssh_host_ed25519_key";
      description = "SSH ed25519 host key the agent's id (its nkey) is derived from (`--host-key`).";
    };
    nkeySeedFile = mkOption {
      type = secretPath;
      default = null;
      description = "An nkey seed file (`SU...`) to use instead of the SSH host key (`--nkey-seed-file`).";
    };
    hostname = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "Hostname to report instead of the system's (`--hostname`).";
    };
    labels = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = { role = "web"; env = "prod"; };
      description = "Labels reported in presence, for `cbus --labels` (`--label KEY=VALUE`).";
    };

    # --- what it bridges and allows ---
    bus = mkOption {
      type = types.str;
      default = "system";
      example = "unix:path=/run/user/1000/bus";
      description = "Bus to bridge: `system`, `user`, or a D-Bus address (`--bus`).";
    };
    policy = mkOption {
      type = toml.type;
      default = { };
      example = literalExpression ''
        {
          allow = [{
            ops = [ "call" ];
            destination = "org.freedesktop.systemd1";
            interface = "org.freedesktop.systemd1.Manager";
            member = "{Start,Stop,Restart,Reload,TryRestart}Unit";
            args = [ "*.service" "{replace,fail}" ];
          }];
          deny = [{
            ops = [ "call" ];
            destination = "org.freedesktop.systemd1";
            member = "{Start,Restart,TryRestart,ReloadOrRestart,ReloadOrTryRestart,Enqueue}Unit*";
            args = [ "{reboot,poweroff,halt,kexec,soft-reboot,ctrl-alt-del}.target" ];
          }];
        }
      '';
      description = ''
        Policy of what may be set or called remotely, written as TOML (see
        `share/cbus/policy.example.toml` of the package): `allow` and `deny` rules of ops and
        globs over destination, interface, member and (optionally) `args`, one glob per
        positional string argument; `deny` wins. Reads are always allowed; with neither this
        nor {option}`policyFile`, the agent is read-only. Every remote set and call is logged
        (target `cbus_agent::audit`).
      '';
    };
    policyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "Policy file (TOML) instead of {option}`policy` (`--policy`).";
    };
    allowAll = mkOption {
      type = types.bool;
      default = false;
      description = "Allow every remote set and call (`--allow-all`); trusted development setups only.";
    };
    heartbeat = mkOption {
      type = types.str;
      default = "5s";
      description = "Presence heartbeat interval (`--heartbeat`).";
    };
    signalQueueBytes = mkOption {
      type = types.ints.positive;
      default = 16 * 1024 * 1024;
      description = ''
        Bytes of signals queued between D-Bus and NATS (`--signal-queue-bytes`); more are
        dropped and counted (`cbus_agent_signals_dropped_by_reason_total`). Keep it well under
        the unit's MemoryMax (256M).
      '';
    };
    metricsListen = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "127.0.0.1:9851";
      description = "Also serve the agent's own /metrics and /healthz here (`--metrics-listen`).";
    };

    logLevel = mkOption {
      type = types.str;
      default = "info";
      example = "info,cbus_agent=debug";
      description = "`RUST_LOG` filter.";
    };
    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--exclude-interface" "org.freedesktop.DBus.Properties" ];
      description = "More cbus-agent flags.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [{
      assertion = lib.length (lib.filter (x: x) [
        cfg.nkeyAuth
        (cfg.credentialsFile != null)
        (cfg.nkeyFile != null)
      ]) <= 1;
      message = "services.cbus-agent: use one of nkeyAuth, credentialsFile and nkeyFile.";
    }];

    systemd.services.cbus-agent = {
      description = "cbus agent: bridges this host's D-Bus to NATS";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" "dbus.service" "sshd.service" "sshd-keygen.service" ];
      wants = [ "network-online.target" ];
      environment.RUST_LOG = cfg.logLevel;
      serviceConfig = {
        ExecStart = utils.escapeSystemdExecArgs (concatLists [
          [ "${cfg.package}/bin/cbus-agent" ]
          [ "--nats-url" (lib.concatStringsSep "," (lib.toList cfg.natsUrl)) ]
          [ "--host-key" cfg.hostKeyFile "--bus" cfg.bus "--heartbeat" cfg.heartbeat ]
          (optional cfg.nkeyAuth "--nats-nkey-auth")
          (optionals (cfg.jsDomain != null) [ "--js-domain" cfg.jsDomain ])
          (optionals (cfg.credentialsFile != null) [ "--creds" (toString cfg.credentialsFile) ])
          (optionals (cfg.nkeyFile != null) [ "--nkey" (toString cfg.nkeyFile) ])
          (optionals (cfg.tlsCaFile != null) [ "--tls-ca" (toString cfg.tlsCaFile) ])
          (optionals (cfg.nkeySeedFile != null) [ "--nkey-seed-file" (toString cfg.nkeySeedFile) ])
          (optionals (cfg.hostname != null) [ "--hostname" cfg.hostname ])
          (optionals (policyFile != null) [ "--policy" (toString policyFile) ])
          (optional cfg.allowAll "--allow-all")
          [ "--signal-queue-bytes" (toString cfg.signalQueueBytes) ]
          (optionals (cfg.metricsListen != null) [ "--metrics-listen" cfg.metricsListen ])
          (concatLists (mapAttrsToList (k: v: [ "--label" "${k}=${v}" ]) cfg.labels))
          cfg.extraArgs
        ]);
        EnvironmentFile = optional (cfg.environmentFile != null) (toString cfg.environmentFile);
        Restart = "always";
        RestartSec = 2;
        # Root for BecomeMonitor and the host key, but nothing to write anywhere.
        NoNewPrivileges = true;
        ProtectSystem = "full";
        ProtectHome = true;
        PrivateTmp = true;
        # Bounded by design (signal queue 16 MiB, oversized signals dropped unread); a runaway
        # agent is killed and restarted rather than starving the host.
        MemoryMax = "256M";
      };
    };
  };
}
