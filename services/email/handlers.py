"""Email: send the order confirmation over SMTP, and one cancellation mail when the order is cancelled.

The SMTP send comes before any database statement and before the commit: with concurrent
lanes the runtime begins the transaction at the first statement, so sends for different orders
run in parallel without holding the database's write lock. A crash between the server's accept
and our commit resends the mail on redelivery; its Message-ID is derived from the event id, so
the resend is recognisable (and dropped by receivers that dedup on it).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.email.mailer import OutgoingMail, message_id_for
from services.email.tables import cancelled_orders, sent_emails
from services.runtime.cancellation import compensated, was_cancelled_before
from services.runtime.events import ConfirmationEmailSent, Event, OrderCancelled, OrderCreated
from services.runtime.handler import UnitOfWork


@dataclass(frozen=True)
class EmailDeps:
    mailer: object  # SmtpMailer in production, RecordingMailer in unit tests
    sender: str


# Built once and executed with parameters: `.values(...)` per mail made SQLAlchemy walk every
# bound value for its cache key, on every message.
_ADD_SENT = sent_emails.insert()


def confirmation_mail(event: OrderCreated, event_id: str, sender: str) -> OutgoingMail:
    lines = "\n".join(f"  {line.quantity} x {line.sku} @ {line.unit_price} {event.currency}" for line in event.lines)
    text = (f"Thank you for your order {event.order_id}.\n\n{lines}\n\n"
            f"Total: {event.total} {event.currency}\n\nWe will let you know when it ships.\n")
    return OutgoingMail(message_id=message_id_for(event_id), sender=sender, recipient=event.customer_email,
                        subject=f"Your order {event.order_id}", text=text)


def cancellation_mail(event: OrderCancelled, event_id: str, sender: str) -> OutgoingMail:
    reason = f"\nReason given: {event.reason}\n" if event.reason else ""
    text = (f"Your order {event.order_id} is cancelled.\n{reason}\n"
            "Any stock we had set aside for it is released, and if you were invoiced, a credit note follows.\n")
    return OutgoingMail(message_id=message_id_for(event_id), sender=sender, recipient=event.customer_email,
                        subject=f"Your order {event.order_id} is cancelled", text=text)


def send_confirmation(event: OrderCreated, uow: UnitOfWork) -> list[Event]:
    if was_cancelled_before(uow, cancelled_orders, event.order_id):
        return []  # the customer has the cancellation mail already; no confirmation after it
    mail = confirmation_mail(event, uow.envelope.event_id, uow.deps.sender)
    uow.deps.mailer.send(mail)
    uow.conn.execute(_ADD_SENT, {"order_id": event.order_id, "message_id": mail.message_id,
                                 "recipient": mail.recipient, "sent_at": uow.now})
    return [ConfirmationEmailSent(order_id=event.order_id, message_id=mail.message_id, recipient=mail.recipient,
                                  sent_at=uow.now)]


def send_cancellation(event: OrderCancelled, uow: UnitOfWork) -> list[Event]:
    """One cancellation mail, whatever the order's state (the inbox runs each event once; the
    orders service writes one OrderCancelled per order)."""
    mail = cancellation_mail(event, uow.envelope.event_id, uow.deps.sender)
    uow.deps.mailer.send(mail)
    return compensated(uow, cancelled_orders, event.order_id,
                       f"cancellation mail {mail.message_id} sent to {mail.recipient}", document=mail.message_id)


HANDLERS = {OrderCreated: [send_confirmation], OrderCancelled: [send_cancellation]}
