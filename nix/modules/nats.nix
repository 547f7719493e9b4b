# services.cbus-nats: a nats-server for a cbus fleet, with one nkey user per machine plus the
# gateway and operator users, each with the permission sets cbus itself defines
# (protocol/src/permissions.rs, printed by `cbus permissions`). The configuration is rendered by
# that command when the service starts, so it cannot drift from what the code relies on: an
# agent may publish only under its own nkey, read only its own requests, inbox and broadcast
# queue group, and never change the registry bucket (docs/security.md).
#
# Passwords come in through LoadCredential and never enter the Nix store. A fleet that outgrows
# one server runs a cluster (`cluster.*`, JetStream replicated; then `cbus registry init
# --replicas 3`) and a leaf node per site (`leafnodes.remotes`, `jetstream.enable = false`,
# `agentJsDomain` = the hub's `jetstream.domain`): docs/deployment.md. TLS and anything else go
# in `extraConfig` (nats-server syntax), appended as is.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.cbus-nats;
  inherit (lib) mkEnableOption mkOption mkIf types concatMapStringsSep literalExpression;
  domainFlag = lib.optionalString (cfg.agentJsDomain != null) " --js-domain ${cfg.agentJsDomain}";
  agentUser = nkey:
    ''echo "  { nkey: ${nkey}, permissions: $("$cbus" permissions agent ${nkey}${domainFlag}) }"'';
  # A JSON string or list is valid nats-server syntax, so values need no quoting by hand.
  json = builtins.toJSON;
  leaf = cfg.leafnodes;
  # Mutual TLS between servers: this server's certificate, and peers must present one the CA
  # signed (`verify`). The files are read by nats-server (user cbus-nats) at start and reload.
  tlsBlock = tls: lib.optionalString (tls != null)
    ", tls { cert_file: ${json tls.certFile}, key_file: ${json tls.keyFile}, ca_file: ${json tls.caFile}, verify: true, timeout: 5 }";
  tlsOption = what: mkOption {
    type = types.nullOr (types.submodule {
      options = {
        certFile = mkOption { type = types.str; description = "This server's certificate (PEM)."; };
        keyFile = mkOption { type = types.str; description = "Its private key (PEM), readable by nats-server only."; };
        caFile = mkOption { type = types.str; description = "The CA that signs every server's certificate (PEM)."; };
      };
    });
    default = null;
    example = literalExpression ''{ certFile = "/etc/nats/tls/server.pem"; keyFile = "/etc/nats/tls/server.key"; caFile = "/etc/nats/tls/ca.pem"; }'';
    description = "Mutual TLS for ${what}: null is plain TCP.";
  };
  baseConfig = pkgs.writeText "cbus-nats-base.conf" (lib.concatStringsSep "\n" (lib.filter (l: l != "") [
    "listen: ${json cfg.listen}"
    (lib.optionalString (cfg.serverName != null) "server_name: ${json cfg.serverName}")
    (lib.optionalString cfg.jetstream.enable (
      "jetstream { store_dir: \"/var/lib/cbus-nats/jetstream\""
      + lib.optionalString (cfg.jetstream.domain != null) ", domain: ${json cfg.jetstream.domain}"
      + " }"))
    (lib.optionalString (cfg.cluster.routes != [ ])
      "cluster { name: ${json cfg.cluster.name}, listen: ${json cfg.cluster.listen}, routes: ${json cfg.cluster.routes}${tlsBlock cfg.cluster.tls} }")
    (lib.optionalString (leaf.listen != null || leaf.remotes != [ ]) (
      "leafnodes { "
      + lib.optionalString (leaf.listen != null) "listen: ${json leaf.listen}${tlsBlock leaf.tls} "
      # One remote with every hub URL: the leaf keeps one connection, to any node that answers.
      + lib.optionalString (leaf.remotes != [ ]) "remotes: [ { urls: ${json leaf.remotes}${tlsBlock leaf.tls} } ] "
      + "}"))
  ]) + "\n");
  render = pkgs.writeShellScript "cbus-nats-config" ''
    set -euo pipefail
    cbus=${cfg.cbusPackage}/bin/cbus
    pw() { tr -d '\n"\\' < "$CREDENTIALS_DIRECTORY/$1"; }
    umask 077
    {
      cat ${baseConfig}
      echo 'authorization { users = ['
      echo "  { user: operator, password: \"$(pw operator)\", permissions: $("$cbus" permissions operator) }"
      echo "  { user: gateway, password: \"$(pw gateway)\", permissions: $("$cbus" permissions gateway) }"
      ${concatMapStringsSep "\n      " agentUser cfg.agents}
      echo '] }'
      cat ${pkgs.writeText "cbus-nats-extra.conf" cfg.extraConfig}
    } > /run/cbus-nats/nats.conf.new
    mv /run/cbus-nats/nats.conf.new /run/cbus-nats/nats.conf
  '';
in
{
  options.services.cbus-nats = {
    enable = mkEnableOption "a nats-server with the users and permissions of a cbus fleet";

    package = mkOption {
      type = types.package;
      default = pkgs.nats-server;
      defaultText = literalExpression "pkgs.nats-server";
      description = "Package providing bin/nats-server.";
    };

    cbusPackage = mkOption {
      type = types.package;
      default = pkgs.cbus or (pkgs.callPackage ../package.nix { });
      defaultText = literalExpression "pkgs.cbus";
      description = "Package providing bin/cbus, whose `cbus permissions` renders the sets.";
    };

    listen = mkOption {
      type = types.str;
      default = "0.0.0.0:4222";
      description = "Client listen address (host:port).";
    };

    agents = mkOption {
      type = types.listOf (types.strMatching "U[A-Z2-7]{55}");
      default = [ ];
      example = [ "UAXB..." ];
      description = ''
        The agents' nkeys (`cbus keyscan HOST...` or `cbus nkey /etc/ssh/ssh_host_ed25519_key.pub`).
        Each becomes a NATS user that may speak only for itself.
      '';
    };

    gatewayPasswordFile = mkOption {
      type = types.either types.path types.str;
      description = "File with the password of the `gateway` user (no double quote or backslash).";
    };

    operatorPasswordFile = mkOption {
      type = types.either types.path types.str;
      description = "File with the password of the `operator` user, for the `cbus` CLI.";
    };

    serverName = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "nats-1";
      description = "`server_name`; every node of a cluster with JetStream needs its own.";
    };

    jetstream = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Run JetStream (the agent registry lives there). A site's leaf node runs without it:
          its agents reach the hub's JetStream through {option}`agentJsDomain`.
        '';
      };
      domain = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "hub";
        description = "JetStream domain of the hub, so agents at sites can address it.";
      };
    };

    cluster = {
      name = mkOption {
        type = types.str;
        default = "cbus";
        description = "Cluster name, the same on every node.";
      };
      listen = mkOption {
        type = types.str;
        default = "0.0.0.0:6222";
        description = "Route listen address (host:port).";
      };
      routes = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "nats-route://nats-1:6222" "nats-route://nats-2:6222" "nats-route://nats-3:6222" ];
        description = "Every node's route URL (this node's own entry is ignored); empty: no cluster.";
      };
      tls = tlsOption "the routes between the cluster's nodes";
    };

    leafnodes = {
      listen = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "0.0.0.0:7422";
        description = "On the hub: where sites' leaf nodes connect.";
      };
      remotes = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "nats-leaf://hub-1:7422" "nats-leaf://hub-2:7422" ];
        description = "On a site's leaf node: the hub's leaf URLs it dials.";
      };
      tls = tlsOption "leaf connections (on the hub: leaves must present a certificate the CA signed; on a leaf: the hub must)";
    };

    agentJsDomain = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "hub";
      description = ''
        On a site's leaf node: the hub's JetStream domain, so each agent's permissions allow its
        registry entry there (`cbus permissions agent NKEY --js-domain`); the agents run with
        the same `jsDomain`.
      '';
    };

    extraConfig = mkOption {
      type = types.lines;
      default = "";
      example = ''
        cluster { name: cbus, listen: 0.0.0.0:6222, routes: [ nats-route://nats-2:6222 ] }
      '';
      description = "nats-server configuration appended as is (cluster, leafnodes, tls).";
    };
  };

  config = mkIf cfg.enable {
    systemd.services.cbus-nats = {
      description = "NATS for the cbus fleet";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      serviceConfig = {
        DynamicUser = true;
        StateDirectory = "cbus-nats";
        RuntimeDirectory = "cbus-nats";
        LoadCredential = [
          "gateway:${toString cfg.gatewayPasswordFile}"
          "operator:${toString cfg.operatorPasswordFile}"
        ];
        ExecStartPre = render;
        ExecStart = "${cfg.package}/bin/nats-server -c /run/cbus-nats/nats.conf";
        # New agents are added by a rebuild; the server rereads its users without dropping anyone.
        ExecReload = [ render "${pkgs.coreutils}/bin/kill -HUP $MAINPID" ];
        # One connection per machine: a fleet of 50,000 needs far more than 1,024 descriptors.
        LimitNOFILE = 1048576;
        Restart = "on-failure";
      };
    };
  };
}
