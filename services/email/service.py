"""The e-mail service, declared: one confirmation mail per order, and one cancellation mail per
cancelled order, over SMTP."""

from __future__ import annotations

from services.email.faults import FlakyMailer
from services.email.handlers import HANDLERS, EmailDeps
from services.email.mailer import MailDeliveryError, MailRejected, SmtpMailer
from services.email.settings import EmailSettings
from services.email.tables import metadata
from services.runtime.controls import WorkerControls
from services.runtime.declaration import StatusStep, consumer_service
from services.runtime.events import ConfirmationEmailSent, StepCompensated
from services.runtime.handler import Service
from services.runtime.service_main import Runtime


def build(runtime: Runtime) -> Service:
    s = runtime.settings.of(EmailSettings)
    password = s.smtp_password.get_secret_value() if s.smtp_password else None
    mailer = SmtpMailer(s.smtp_host, s.smtp_port, username=s.smtp_username, password=password,
                        starttls=s.smtp_starttls)
    if s.email_fail_rate:
        mailer = FlakyMailer(mailer, s.email_fail_rate)
    # SMTP sends are slow and each one is an external effect: small batches bound the resends
    # a crash can cause. Sends are I/O-bound, so 8 lanes send for different orders at once
    # (ORDERPIPE_WORKERS__EMAIL__CONCURRENCY; ..._RATE_LIMIT_MAX for the provider's limit).
    return Service(runtime.group, metadata, HANDLERS, deps=EmailDeps(mailer, s.mail_from),
                   retryable=(MailDeliveryError,), permanent=(MailRejected,),
                   batch_size=min(50, runtime.settings.consumer_batch_size), controls=WorkerControls(concurrency=8))


SERVICE = consumer_service(
    "email", package_file=__file__, metadata=metadata, handlers=HANDLERS, emits=(ConfirmationEmailSent, StepCompensated),
    build=build, settings=EmailSettings, step=StatusStep(done={"ConfirmationEmailSent": "message_id"}))
