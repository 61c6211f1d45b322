from __future__ import annotations

from services.email.handlers import HANDLERS, EmailDeps
from services.email.mailer import MailDeliveryError, MailRejected, SmtpMailer
from services.email.tables import metadata
from services.runtime.consumer import Service
from services.runtime.service_main import Runtime
from services.runtime.topology import group


def build(runtime: Runtime) -> Service:
    s = runtime.settings
    mailer = SmtpMailer(s.smtp_host, s.smtp_port, username=s.smtp_username, password=s.smtp_password,
                        starttls=s.smtp_starttls)
    # SMTP sends are slow and each one is an external effect: small batches bound the resends
    # a crash can cause.
    return Service(group("email"), metadata, HANDLERS, deps=EmailDeps(mailer, s.mail_from),
                   retryable=(MailDeliveryError,), permanent=(MailRejected,),
                   batch_size=min(50, s.consumer_batch_size))
