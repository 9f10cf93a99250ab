"""otpgate: two-factor (TOTP) protection for SSH logins."""

__version__ = "0.1.0"
