from sqlalchemy import Column, Integer, MetaData, String, Table

metadata = MetaData()

points = Table(
    "loyalty_points", metadata,
    Column("customer_id", String(64), primary_key=True),
    Column("points", Integer, nullable=False),
)
