#!/bin/sh
# Runs inside the booted container (a oneshot unit after multi-user.target).
# Each check writes "ok NAME" or "FAIL NAME" to /root/e2e-results; the host reads it.
exec >/root/e2e.log 2>&1
set -x
results=/root/e2e-results
: >"$results"
check() { name=$1; shift; if "$@"; then echo "ok $name" >>"$results"; else echo "FAIL $name" >>"$results"; fi; }
finish() {
  journalctl -u otpgated --no-pager >/root/journal-otpgated.log 2>&1
  journalctl -u ssh --no-pager >/root/journal-ssh.log 2>&1
  echo "done" >>"$results"
  systemctl poweroff --no-block
}
trap finish EXIT

for i in $(seq 100); do systemctl is-active -q ssh && break; sleep 0.2; done
useradd -m -s /bin/bash alice
echo 'alice:Alice-pw-1' | chpasswd

ssh_opts="-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o PubkeyAuthentication=no -o ConnectTimeout=20"
password_only() {
  SSHPASS=Alice-pw-1 sshpass -e ssh $ssh_opts -o PreferredAuthentications=password,keyboard-interactive \
    alice@127.0.0.1 echo otpgate-ok | grep -qx otpgate-ok
}
# ssh asks SSH_ASKPASS for each prompt: the password first, then the code ($1).
password_and_code() {
  rm -f /root/askpass.count
  printf 'Alice-pw-1\n%s\n' "$1" >/root/askpass.answers
  cat >/root/askpass <<'EOS'
#!/bin/sh
n=$(cat /root/askpass.count 2>/dev/null || echo 0); n=$((n + 1)); echo $n >/root/askpass.count
sed -n "${n}p" /root/askpass.answers
EOS
  chmod 700 /root/askpass
  SSH_ASKPASS=/root/askpass SSH_ASKPASS_REQUIRE=force DISPLAY=:0 setsid -w ssh $ssh_opts \
    -o PreferredAuthentications=password,keyboard-interactive alice@127.0.0.1 echo otpgate-ok \
    </dev/null | grep -qx otpgate-ok
}

check ssh_active systemctl is-active -q ssh
check baseline_password_login password_only
check dpkg_install dpkg -i /root/otpgate.deb
check unit_active systemctl is-active -q otpgated
check unit_type_notify test "$(systemctl show -p Type --value otpgated)" = notify
check key_created test -s /etc/otpgate/otpgate.key
key_before=$(sha256sum /etc/otpgate/otpgate.key)
secret=$(otpgate renew-secret alice --qr none | sed 's/.*secret=\([A-Z0-9]*\).*/\1/')
check enroll_admin otpgate renew-secret root --qr none
check enable otpgate update enabled=true services.ssh=true window=1
check setup_ssh otpgate setup ssh --flow password
check doctor_clean otpgate doctor
check otp_login password_and_code "$(oathtool --totp -b "$secret")"
wrong=$(oathtool --totp -b "$secret" -N "@$(($(date +%s) + 600))")
if password_and_code "$wrong"; then echo "FAIL wrong_code_refused" >>"$results"; else echo "ok wrong_code_refused" >>"$results"; fi
if password_only; then echo "FAIL password_alone_refused" >>"$results"; else echo "ok password_alone_refused" >>"$results"; fi
# Self-service through the hardened unit: LoginEx runs PAM inside otpgated.
next=$(oathtool --totp -b "$secret" -N "@$(($(date +%s) + 30))")
check self_service sh -c "printf 'Alice-pw-1\n$next\n' | runuser -u alice -- otpgate --password-stdin user show | grep -q 'twofactor_auth_configured  true'"
check dpkg_remove dpkg -r otpgate
check unwired sh -c '! grep -q otpgate-ssh /etc/pam.d/sshd'
check login_after_remove password_only
check state_kept test -d /var/lib/otpgate -a -f /etc/otpgate/otpgate.key
check reinstall dpkg -i /root/otpgate.deb
check key_kept test "$(sha256sum /etc/otpgate/otpgate.key)" = "$key_before"
check enrollment_kept sh -c "otpgate user show alice --json | grep -q '\"twofactor_auth_configured\": true'"
check purge dpkg -P otpgate
check purged sh -c '! test -e /etc/otpgate'
check login_after_purge password_only
