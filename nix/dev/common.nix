# What every cbus dev machine runs: the agent (as in production, from the NixOS module) next to
# the demo units of `./dev up`, so the same commands work against the nspawn fleet and the VMs:
#   cbus units 'cbus-demo*'      cbus --hosts cbus-1 restart cbus-demo-web.service
{ natsUrl, role ? "web" }:
{ pkgs, ... }:
{
  services.cbus-agent = {
    enable = true;
    inherit natsUrl;
    # The dev NATS (`nix run .#dev-nats`) has no users: the VMs' host keys are made at first
    # boot, so their nkeys are not known in advance. Production keeps nkey auth (the default).
    nkeyAuth = false;
    labels = { env = "dev"; inherit role; };
    policy.allow = [{
      ops = [ "call" ];
      destination = "org.freedesktop.systemd1";
      interface = "org.freedesktop.systemd1.Manager";
      member = "{Start,Stop,Restart,Reload,TryRestart}Unit";
    }];
  };

  systemd.services.cbus-demo-web = {
    description = "cbus demo web server on port 8000";
    wantedBy = [ "multi-user.target" ];
    serviceConfig = {
      ExecStart = "${pkgs.python3}/bin/python3 -m http.server 8000 --directory ${pkgs.python3}/share";
      DynamicUser = true;
      Restart = "on-failure";
    };
  };
  systemd.services.cbus-demo-worker = {
    description = "cbus demo worker";
    wantedBy = [ "multi-user.target" ];
    serviceConfig = {
      ExecStart = "${pkgs.coreutils}/bin/sleep infinity";
      DynamicUser = true;
      Restart = "on-failure";
    };
  };
  systemd.services.cbus-demo-tick = {
    description = "cbus demo tick";
    serviceConfig.Type = "oneshot";
    script = "true";
  };
  systemd.timers.cbus-demo-tick = {
    description = "cbus demo tick every minute";
    wantedBy = [ "timers.target" ];
    timerConfig.OnCalendar = "minutely";
  };

  environment.systemPackages = [ pkgs.cbus ];
  services.openssh.enable = true;
  system.stateVersion = "24.11";
}
